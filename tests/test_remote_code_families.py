"""Role tables of families whose Hub checkpoints need trust_remote_code (their modelling code lives on the Hub).

Each is a transformers family under other names: a tiny native model's state dict is renamed (and, where the remote
code fuses projections, fused as it splits them) into the remote checkpoint's names and saved with the remote config.
Its roles must be the native table's roles of the counterparts, and claim every name mergekit's definition lists;
merges of such checkpoints, renamed back, must equal the same merges of the native ones and reload in transformers;
a turn of the residual stream by the remote table alone must keep the native model's function, and SeMe must align a
turned copy back (or, where the family cannot turn, refuse in one line).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
yaml = pytest.importorskip("yaml")

import seme  # noqa: E402
from bench.zoo import rotate  # noqa: E402
from seme.architectures import for_config  # noqa: E402
from seme.merge import main  # noqa: E402
from test_architectures import DECODER, perturbed  # noqa: E402
from test_seme import seme_merge  # noqa: E402


def same(ts, config):
    return ts[0]


def cat(ts, config):  # query, key and value stacked (Baichuan's W_pack, Qwen's c_attn: thirds of heads' rows)
    return torch.cat(ts)


def stacked(ts, config):  # query, key and value one after the other, whatever their heads (OpenELM's qkv_proj)
    return torch.cat(ts)


def grouped(ts, config):
    """InternLM2's wqkv: per key-value head, its group's query heads, then its key head, then its value head (the
    remote code's rearrange '(h gs d) -> h gs d' with gs = groups + 2, and InternLM's convert2llama.py)."""
    kv, rest = config["num_key_value_heads"], ts[0].shape[1:]
    return torch.cat([t.reshape(kv, -1, *rest) for t in ts], 1).reshape(-1, *rest)


def split(t, config, fuse, n):
    """The `n` native tensors a remote tensor holds (its rows as `fuse` laid them out)."""
    if fuse is same:
        return [t]
    if fuse is cat:
        return list(t.chunk(n))
    if fuse is stacked:
        head = config["head_dim"]
        return list(t.split([config["num_attention_heads"] * head] + [config["num_key_value_heads"] * head] * 2))
    kv, rest = config["num_key_value_heads"], t.shape[1:]
    head = config["hidden_size"] // config["num_attention_heads"]
    queries = config["num_attention_heads"] // kv * head
    return [p.reshape(-1, *rest) for p in t.reshape(kv, -1, *rest).split([queries, head, head], 1)]


@dataclass(frozen=True)
class Remote:
    """A remote-code family as a native one: its table, the native classes and config, the remote config from the
    native one (`config`, with the key of its depth, `depth_key`), and per remote name template (layer {i}) the native
    templates it holds and how they are fused."""
    table: str
    native: tuple[str, str]
    kwargs: dict
    config: Callable[[dict], dict]
    depth_key: str
    names: tuple
    mergekit: str = ""  # mergekit's definition of the family (none: mergekit infers the family from its weights)
    rotatable: bool = True
    cases: tuple = ({},)  # settings beyond kwargs that each get a checkpoint
    vocab: dict = field(default_factory=dict)  # settings of the checkpoints SeMe turns (Baichuan 1's vocabulary)


def remote_config(native: dict, **remote) -> dict:
    """The settings every remote config copies from the native one."""
    keep = ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")
    return {**{k: native[k] for k in keep if k in native}, **remote}


LLAMA = ("LlamaConfig", "LlamaForCausalLM")
EXAONE_NAMES = (
    ("transformer.wte.weight", ("model.embed_tokens.weight",), same),
    ("lm_head.weight", ("lm_head.weight",), same),
    ("transformer.ln_f.weight", ("model.norm.weight",), same),
    ("transformer.h.{i}.ln_1.weight", ("model.layers.{i}.input_layernorm.weight",), same),
    ("transformer.h.{i}.attn.attention.q_proj.weight", ("model.layers.{i}.self_attn.q_proj.weight",), same),
    ("transformer.h.{i}.attn.attention.k_proj.weight", ("model.layers.{i}.self_attn.k_proj.weight",), same),
    ("transformer.h.{i}.attn.attention.v_proj.weight", ("model.layers.{i}.self_attn.v_proj.weight",), same),
    ("transformer.h.{i}.attn.attention.out_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), same),
    ("transformer.h.{i}.ln_2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), same),
    ("transformer.h.{i}.mlp.c_fc_0.weight", ("model.layers.{i}.mlp.gate_proj.weight",), same),
    ("transformer.h.{i}.mlp.c_fc_1.weight", ("model.layers.{i}.mlp.up_proj.weight",), same),
    ("transformer.h.{i}.mlp.c_proj.weight", ("model.layers.{i}.mlp.down_proj.weight",), same),
)
INTERNLM2_NAMES = (
    ("model.tok_embeddings.weight", ("model.embed_tokens.weight",), same),
    ("output.weight", ("lm_head.weight",), same),
    ("model.norm.weight", ("model.norm.weight",), same),
    ("model.layers.{i}.attention_norm.weight", ("model.layers.{i}.input_layernorm.weight",), same),
    *((f"model.layers.{{i}}.attention.wqkv.{p}", tuple(f"model.layers.{{i}}.self_attn.{x}_proj.{p}" for x in "qkv"), grouped)
      for p in ("weight", "bias")),
    *((f"model.layers.{{i}}.attention.wo.{p}", (f"model.layers.{{i}}.self_attn.o_proj.{p}",), same) for p in ("weight", "bias")),
    ("model.layers.{i}.ffn_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), same),
    ("model.layers.{i}.feed_forward.w1.weight", ("model.layers.{i}.mlp.gate_proj.weight",), same),
    ("model.layers.{i}.feed_forward.w3.weight", ("model.layers.{i}.mlp.up_proj.weight",), same),
    ("model.layers.{i}.feed_forward.w2.weight", ("model.layers.{i}.mlp.down_proj.weight",), same),
)
QWEN_NAMES = (
    ("transformer.wte.weight", ("model.embed_tokens.weight",), same),
    ("lm_head.weight", ("lm_head.weight",), same),
    ("transformer.ln_f.weight", ("model.norm.weight",), same),
    ("transformer.h.{i}.ln_1.weight", ("model.layers.{i}.input_layernorm.weight",), same),
    *((f"transformer.h.{{i}}.attn.c_attn.{p}", tuple(f"model.layers.{{i}}.self_attn.{x}_proj.{p}" for x in "qkv"), cat)
      for p in ("weight", "bias")),
    ("transformer.h.{i}.attn.c_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), same),
    ("transformer.h.{i}.ln_2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), same),
    ("transformer.h.{i}.mlp.w1.weight", ("model.layers.{i}.mlp.up_proj.weight",), same),
    ("transformer.h.{i}.mlp.w2.weight", ("model.layers.{i}.mlp.gate_proj.weight",), same),
    ("transformer.h.{i}.mlp.c_proj.weight", ("model.layers.{i}.mlp.down_proj.weight",), same),
)


def qwen_config(c: dict, early: bool = False) -> dict:
    """QWenConfig's settings (the first releases': GPT-2's names for the width, depth and heads); its MLP's two
    projections are each intermediate_size / 2 wide."""
    width, depth, heads = ("n_embd", "n_layer", "n_head") if early else ("hidden_size", "num_hidden_layers",
                                                                         "num_attention_heads")
    config = remote_config(c, architectures=["QWenLMHeadModel"], model_type="qwen", kv_channels=c["hidden_size"] //
                           c["num_attention_heads"], layer_norm_epsilon=c["rms_norm_eps"], rotary_pct=1.0,
                           rotary_emb_base=10000, no_bias=True, use_dynamic_ntk=False, use_logn_attn=False,
                           **{width: c["hidden_size"], depth: c["num_hidden_layers"], heads: c["num_attention_heads"],
                              "ffn_hidden_size" if early else "intermediate_size": 2 * c["intermediate_size"]})
    return {k: v for k, v in config.items() if not early or k not in ("hidden_size", "num_attention_heads")}

STABLELM_NAMES = (
    ("model.embed_tokens.weight", ("model.embed_tokens.weight",), same),
    ("lm_head.weight", ("lm_head.weight",), same),
    *((f"model.norm.{p}", (f"model.norm.{p}",), same) for p in ("weight", "bias")),
    *((f"model.layers.{{i}}.{m}.{p}", (f"model.layers.{{i}}.{m}.{p}",), same)
      for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj") for p in ("weight", "bias")),
    *((f"model.layers.{{i}}.{m}.weight", (f"model.layers.{{i}}.{m}.weight",), same)
      for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
)
BAICHUAN_NAMES = (
    ("model.embed_tokens.weight", ("model.embed_tokens.weight",), same),
    ("lm_head.weight", ("lm_head.weight",), same),
    ("model.norm.weight", ("model.norm.weight",), same),
    ("model.layers.{i}.self_attn.W_pack.weight", tuple(f"model.layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkv"), cat),
    *((f"model.layers.{{i}}.{m}.weight", (f"model.layers.{{i}}.{m}.weight",), same)
      for m in ("input_layernorm", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj")),
)


def baichuan_config(c: dict, architecture: str) -> dict:
    return remote_config(c, architectures=[architecture], model_type="baichuan", num_hidden_layers=c["num_hidden_layers"],
                         intermediate_size=c["intermediate_size"], hidden_act="silu", rms_norm_eps=c["rms_norm_eps"],
                         model_max_length=c["max_position_embeddings"])

# MiniCPM 1 / 2 / 4: Llama's names; its muP scalars are Granite's multipliers (scale_emb the embedding's, scale_depth /
# sqrt(depth) the residual's, hidden_size / dim_model_base the logits' divisor), so Granite runs it as it is
LLAMA_NAMES = tuple((n, (n,), same) for n in (
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    *(f"model.layers.{{i}}.{m}.weight" for m in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                                                   "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
                                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    *(f"model.layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkvo")))
MINICPM = dict(DECODER, embedding_multiplier=12.0, residual_multiplier=1.4 / 2 ** 0.5, logits_scaling=4.0,
               attention_multiplier=8 ** -0.5)


def minicpm_config(c: dict) -> dict:
    return remote_config(c, architectures=["MiniCPMForCausalLM"], model_type="minicpm",
                         num_hidden_layers=c["num_hidden_layers"], num_key_value_heads=c["num_key_value_heads"],
                         intermediate_size=c["intermediate_size"], rms_norm_eps=c["rms_norm_eps"], hidden_act="silu",
                         rope_theta=10000.0, attention_bias=c["attention_bias"], scale_emb=c["embedding_multiplier"],
                         scale_depth=c["residual_multiplier"] * c["num_hidden_layers"] ** 0.5,
                         dim_model_base=round(c["hidden_size"] / c["logits_scaling"]))


# MiniCPM-MoE-8x2B: Mixtral's layers under MiniCPM's names (vLLM's minicpm.py: w1 the gate, w3 the up projection), its
# muP scalars left at what Mixtral computes (no embedding scale, residual branches and logits undivided)
MINICPM_MOE = dict(DECODER, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
MINICPM_MOE_NAMES = (
    *((n, (n,), same) for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                                *(f"model.layers.{{i}}.{m}.weight" for m in (
                                    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "post_attention_layernorm")))),
    ("model.layers.{i}.mlp.gate.weight", ("model.layers.{i}.block_sparse_moe.gate.weight",), same),
    *((f"model.layers.{{i}}.mlp.experts.{e}.{w}.weight", (f"model.layers.{{i}}.block_sparse_moe.experts.{e}.{w}.weight",),
       same) for e in range(MINICPM_MOE["num_local_experts"]) for w in ("w1", "w2", "w3")),
)


def minicpm_moe_config(c: dict) -> dict:
    return remote_config(c, architectures=["MiniCPMForCausalLM"], model_type="minicpm",
                         num_hidden_layers=c["num_hidden_layers"], num_key_value_heads=c["num_key_value_heads"],
                         intermediate_size=c["intermediate_size"], rms_norm_eps=c["rms_norm_eps"], hidden_act="silu",
                         rope_theta=10000.0, num_experts=c["num_local_experts"],
                         num_experts_per_tok=c["num_experts_per_tok"], scale_emb=1,
                         scale_depth=c["num_hidden_layers"] ** 0.5, dim_model_base=c["hidden_size"])


def internlm_config(c: dict) -> dict:
    return remote_config(c, architectures=["InternLMForCausalLM"], model_type="internlm",
                         num_hidden_layers=c["num_hidden_layers"], intermediate_size=c["intermediate_size"],
                         rms_norm_eps=c["rms_norm_eps"], hidden_act="silu", bias=c["attention_bias"], rotary={
                             "base": 10000, "type": "dynamic"})


def decilm_block(c: dict, heads_in_group: int | None = None, ffn_mult: float | None = None, **kinds) -> dict:
    """A Nemotron-NAS block_configs entry: a Llama block of `c`'s key-value heads and MLP width (ffn_mult, whose
    width is 2 * ffn_mult * hidden_size / 3 rounded up to a multiple of 256), or the kinds set (attention_no_op=...)."""
    flags = lambda part: {k: kinds.get(f"{part}_{k}", False) for k in ("no_op", "replace_with_linear")}
    return {"attention": {"n_heads_in_group": heads_in_group or c["num_attention_heads"] // c["num_key_value_heads"],
                          **flags("attention")},
            "ffn": {"ffn_mult": ffn_mult or 3 * c["intermediate_size"] / (2 * c["hidden_size"]), **flags("ffn")}}


def decilm_config(c: dict, model_type: str = "nemotron-nas") -> dict:
    """DeciLMConfig's settings: Nemotron-NAS's a block_configs entry per layer (all Llama blocks here), DeciLM-7B's
    (deci) its key-value heads per layer."""
    depth = c["num_hidden_layers"]
    per_layer = {"block_configs": [decilm_block(c)] * depth} if model_type == "nemotron-nas" else {
        "num_key_value_heads_per_layer": [c["num_key_value_heads"]] * depth}
    return remote_config(c, architectures=["DeciLMForCausalLM"], model_type=model_type, num_hidden_layers=depth,
                         rms_norm_eps=c["rms_norm_eps"], hidden_act="silu", rope_theta=10000.0,
                         attention_bias=c["attention_bias"], mlp_bias=c["mlp_bias"], **per_layer)


OPENELM_NAMES = (
    ("transformer.token_embeddings.weight", ("model.embed_tokens.weight",), same),
    ("lm_head.weight", ("lm_head.weight",), same),
    ("transformer.norm.weight", ("model.norm.weight",), same),
    ("transformer.layers.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",), same),
    ("transformer.layers.{i}.attn.qkv_proj.weight", tuple(f"model.layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkv"),
     stacked),
    ("transformer.layers.{i}.attn.q_norm.weight", ("model.layers.{i}.self_attn.q_norm.weight",), same),
    ("transformer.layers.{i}.attn.k_norm.weight", ("model.layers.{i}.self_attn.k_norm.weight",), same),
    ("transformer.layers.{i}.attn.out_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), same),
    ("transformer.layers.{i}.ffn_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), same),
    ("transformer.layers.{i}.ffn.proj_1.weight", tuple(f"model.layers.{{i}}.mlp.{x}_proj.weight" for x in ("gate", "up")),
     cat),
    ("transformer.layers.{i}.ffn.proj_2.weight", ("model.layers.{i}.mlp.down_proj.weight",), same),
)


def openelm_config(c: dict) -> dict:
    """OpenELMConfig's settings: its own keys for the width, depth and tying; heads and MLP widths per layer (the
    MLP's: make_divisible(ffn_multiplier * model_dim, ffn_dim_divisor), here intermediate_size exactly)."""
    depth = c["num_hidden_layers"]
    return {"architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "vocab_size": c["vocab_size"],
            "model_dim": c["hidden_size"], "num_transformer_layers": depth, "head_dim": c["head_dim"],
            "num_query_heads": [c["num_attention_heads"]] * depth, "num_kv_heads": [c["num_key_value_heads"]] * depth,
            "num_gqa_groups": c["num_attention_heads"] // c["num_key_value_heads"],
            "ffn_multipliers": [c["intermediate_size"] / c["hidden_size"]] * depth, "ffn_dim_divisor": 8,
            "ffn_with_glu": True, "activation_fn_name": "swish", "normalization_layer_name": "rms_norm",
            "normalize_qk_projections": True, "share_input_output_layers": c["tie_word_embeddings"],
            "rope_freq_constant": 10000, "rope_max_length": 2 * c["max_position_embeddings"],
            "max_context_length": c["max_position_embeddings"],
            **{k: c[k] for k in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype") if k in c}}


DECILM = dict(DECODER, intermediate_size=256)  # ffn_mult 12: Nemotron-NAS's MLP widths are multiples of 256

REMOTE = {
    # EXAONE 3.0 / 3.5: Llama (vLLM's exaone.py: c_fc_0 is the gate); the depth is num_layers
    "exaone": Remote("exaone", LLAMA, DECODER, lambda c: remote_config(
        c, architectures=["ExaoneForCausalLM"], model_type="exaone", num_layers=c["num_hidden_layers"],
        num_key_value_heads=c["num_key_value_heads"], intermediate_size=c["intermediate_size"],
        layer_norm_epsilon=c["rms_norm_eps"], activation_function="silu", rope_theta=10000.0),
        "num_layers", EXAONE_NAMES, "exaone", cases=({"tie_word_embeddings": False}, {"tie_word_embeddings": True})),
    # InternLM2 / 2.5: Llama with query, key and value fused per key-value head (2 query heads per group here)
    "internlm2": Remote("internlm2", LLAMA, DECODER, lambda c: remote_config(
        c, architectures=["InternLM2ForCausalLM"], model_type="internlm2", num_hidden_layers=c["num_hidden_layers"],
        num_key_value_heads=c["num_key_value_heads"], intermediate_size=c["intermediate_size"],
        rms_norm_eps=c["rms_norm_eps"], hidden_act="silu", bias=c["attention_bias"], rope_theta=10000.0),
        "num_hidden_layers", INTERNLM2_NAMES, "internlm2",
        cases=({"tie_word_embeddings": False}, {"tie_word_embeddings": True}, {"attention_bias": True})),
    # Qwen (v1): Qwen2's layers (biases on query, key and value only), all heads of their own keys and values
    "qwen": Remote("qwen", ("Qwen2Config", "Qwen2ForCausalLM"), dict(DECODER, num_key_value_heads=4), qwen_config,
                   "num_hidden_layers", QWEN_NAMES, "qwen", cases=({"tie_word_embeddings": False},)),
    "qwen:early": Remote("qwen", ("Qwen2Config", "Qwen2ForCausalLM"), dict(DECODER, num_key_value_heads=4),
                         lambda c: qwen_config(c, early=True), "n_layer", QWEN_NAMES, "qwen",
                         cases=({"tie_word_embeddings": False},)),
    # StableLM Epoch: transformers' StableLM under the same names, its config's own keys (LayerNorms: no turn)
    "stablelm_epoch": Remote("stablelm", ("StableLmConfig", "StableLmForCausalLM"), DECODER, lambda c: remote_config(
        c, architectures=["StableLMEpochForCausalLM"], model_type="stablelm_epoch", num_hidden_layers=c["num_hidden_layers"],
        num_key_value_heads=c["num_key_value_heads"], intermediate_size=c["intermediate_size"], hidden_act="silu",
        rope_pct=c["rope_parameters"]["partial_rotary_factor"], rope_theta=10000, norm_eps=c["layer_norm_eps"],
        use_qkv_bias=c["use_qkv_bias"]), "num_hidden_layers", STABLELM_NAMES, "stablelm", rotatable=False,
        cases=({"use_qkv_bias": False}, {"use_qkv_bias": True})),
    # Baichuan 2 (its head normalised at run time: refused a turn) and Baichuan 1 (of 64000 tokens: turned): Llama,
    # all heads of their own keys and values
    "baichuan": Remote("baichuan", LLAMA, dict(DECODER, num_key_value_heads=4),
                       lambda c: baichuan_config(c, "BaichuanForCausalLM"), "num_hidden_layers", BAICHUAN_NAMES,
                       "baichuan", rotatable=False, cases=({"tie_word_embeddings": False},)),
    "baichuan:1": Remote("baichuan", LLAMA, dict(DECODER, num_key_value_heads=4),
                         lambda c: baichuan_config(c, "BaiChuanForCausalLM"), "num_hidden_layers", BAICHUAN_NAMES,
                         "baichuan", cases=(), vocab={"vocab_size": 64000}),
    "llama:minicpm": Remote("llama", ("GraniteConfig", "GraniteForCausalLM"), MINICPM, minicpm_config,
                            "num_hidden_layers", LLAMA_NAMES, cases=({"tie_word_embeddings": False},
                                                                     {"tie_word_embeddings": True}, {"attention_bias": True})),
    "llama:minicpm_moe": Remote("llama", ("MixtralConfig", "MixtralForCausalLM"), MINICPM_MOE, minicpm_moe_config,
                                "num_hidden_layers", MINICPM_MOE_NAMES,
                                cases=({"tie_word_embeddings": False}, {"tie_word_embeddings": True})),
    # InternLM (v1): Llama, all heads of their own keys and values; its bias sets the attention's four biases
    "llama:internlm": Remote("llama", LLAMA, dict(DECODER, num_key_value_heads=4), internlm_config, "num_hidden_layers",
                             LLAMA_NAMES, cases=({"attention_bias": True}, {"attention_bias": False})),
    # Nemotron-NAS (Llama-3.x-Nemotron 51B / Super-49B / Ultra-253B) and DeciLM-7B: Llama's names; here every
    # layer a Llama block (heterogeneous ones: test_nemotron_nas_* at the end)
    "decilm": Remote("decilm", LLAMA, DECILM, decilm_config, "num_hidden_layers", LLAMA_NAMES,
                     cases=({"tie_word_embeddings": False}, {"attention_bias": True})),
    "decilm:deci": Remote("decilm", LLAMA, DECILM, lambda c: decilm_config(c, "deci"), "num_hidden_layers", LLAMA_NAMES,
                          cases=({"tie_word_embeddings": False},)),
    # OpenELM: Qwen3's layers (q_norm / k_norm over each head before the rotary positions, RMSNorms of eps 1e-6), query,
    # key and value in one Linear, gate and up in another
    "openelm": Remote("openelm", ("Qwen3Config", "Qwen3ForCausalLM"), dict(DECODER, head_dim=8, rms_norm_eps=1e-6),
                      openelm_config, "num_transformer_layers", OPENELM_NAMES,
                      cases=({"tie_word_embeddings": True}, {"tie_word_embeddings": False})),
}
CASES = [(f, extra) for f, r in REMOTE.items() for extra in r.cases]
TABLES = {r.table for r in REMOTE.values()} | {"phi3_v"}  # Phi-3-vision: its own tests, at the end


def case_id(case):
    family, extra = case
    return family + "".join(f"-{k}={v}" for k, v in extra.items())


def native_model(family: str, extra: dict, seed: int = 0):
    config_cls, model_cls = REMOTE[family].native
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**REMOTE[family].kwargs, **extra})
    return getattr(transformers, model_cls)(config).eval()


def layered(template: str, depth: int, experts: int = 0):
    """A template's names in `depth` layers (and, with {expert}, for each of `experts` experts)."""
    names = [template.format(i=i, expert="{expert}") for i in range(depth)] if "{i}" in template else [template]
    return [n.format(expert=e) for n in names for e in range(experts)] if "{expert}" in template else names


def to_remote(family: str, state: dict, config: dict) -> dict:
    """A native state dict in the remote checkpoint's names (every tensor renamed or fused)."""
    out, used = {}, set()
    for remote, natives, fuse in REMOTE[family].names:
        for i in range(config["num_hidden_layers"]) if "{i}" in remote else [None]:
            names = [n.format(i=i) for n in natives]
            if all(n in state for n in names):
                out[remote.format(i=i)] = fuse([state[n] for n in names], config)
                used.update(names)
    assert used == set(state), set(state) - used
    return out


def counterparts(family: str, name: str, depth: int) -> tuple[list[str], Callable]:
    """The native names a remote tensor holds, and how they are fused."""
    for remote, natives, fuse in REMOTE[family].names:
        for i in range(depth) if "{i}" in remote else [None]:
            if remote.format(i=i) == name:
                return [n.format(i=i) for n in natives], fuse
    raise KeyError(name)


def to_native(family: str, state: dict, config: dict) -> dict:
    out = {}
    for name, t in state.items():
        natives, fuse = counterparts(family, name, config["num_hidden_layers"])
        out.update(zip(natives, split(t, config, fuse, len(natives)), strict=True))
    return out


def save(path, state: dict, config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
                                metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def checkpoints(family: str, extra: dict, root, tuned: int = 0) -> list[tuple[str, str]]:
    """(native folder, remote folder) of a perturbed native model and `tuned` fine-tunes of it (small deltas)."""
    base = perturbed(native_model(family, extra))
    base.save_pretrained(root / "native0")
    config = json.loads((root / "native0" / "config.json").read_text())
    state = safetensors_torch.load_file(root / "native0" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    folders = [(str(root / "native0"), save(root / "remote0", to_remote(family, state, config),
                                             REMOTE[family].config(config)))]
    for k in range(1, tuned + 1):
        tuned_state = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in state.items()}
        folders.append((save(root / f"native{k}", tuned_state, config),
                        save(root / f"remote{k}", to_remote(family, tuned_state, config), REMOTE[family].config(config))))
    return folders


def mergekit_definition(family: str) -> dict:
    import mergekit

    path = os.path.join(os.path.dirname(mergekit.__file__), "_data", "architectures", REMOTE[family].mergekit + ".json")
    with open(path) as f:
        return json.load(f)


def mergekit_names(definition: dict, depth: int) -> list[tuple[str, dict]]:
    """(name, entry) of every weight a mergekit definition lists, for `depth` layers."""
    layers = [(w["name"].replace("${layer_index}", str(i)), w) for i in range(depth)
              for w in definition["layer_templates"]["weights"]]
    return [(w["name"], w) for w in definition.get("pre_weights", []) + definition.get("post_weights", [])] + layers


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_remote_names_have_their_native_counterparts_roles(case, tmp_path):
    """Every tensor of the remote checkpoint has the role the native family's table gives its counterparts (a fused
    one: each of the projections it holds), in the same layer, read from the same norm; every required template is
    there; and every weight mergekit's definition lists is claimed (a tied head: by the embedding it is tied to)."""
    family, extra = case
    (native, remote), = checkpoints(family, extra, tmp_path)
    native_config, config = (json.loads(open(os.path.join(p, "config.json")).read()) for p in (native, remote))
    native_arch, arch = for_config(native_config), for_config(config)
    assert arch.name == REMOTE[family].table and not arch.inferred
    depth = native_config["num_hidden_layers"]
    assert arch.num_layers(config) == depth and arch.hidden_size(config) == 32
    assert arch.tied(config) == native_arch.tied(native_config)
    names = safetensors_torch.load_file(os.path.join(remote, "model.safetensors")).keys()
    rename = lambda n: n and counterparts(family, n, depth)[0][0]  # a norm or an embedding: one native tensor
    for name in names:
        r = arch.role(name)
        assert r is not None, name
        for native_name in counterparts(family, name, depth)[0]:
            n = native_arch.role(native_name)
            assert (r.role, r.layer, rename(r.norm), rename(r.tied_to)) == (n.role, n.layer, n.norm, n.tied_to), name
    for template, spec in arch.tensors.items():
        if not spec.optional and not (spec.role == "lm_head" and arch.tied(config)):
            assert all(n in names for n in layered(template.replace("{layer}", "{i}"), depth,
                                                     config.get("num_experts", 0))), template
    if not REMOTE[family].mergekit:
        return
    definition = mergekit_definition(family)
    for name, entry in mergekit_names(definition, depth):
        r = arch.role(name)
        assert r is not None and (name in names or entry.get("optional") or r.tied_to in names), name
    for claimed in definition["architectures"]:
        assert for_config({"architectures": [claimed], "model_type": definition["model_type"]}).name == arch.name


def merged(recipe: dict, out) -> tuple[dict, dict]:
    seme.merge(yaml.safe_dump({"dtype": "float32", **recipe}), str(out), progress=False)
    return (safetensors_torch.load_file(os.path.join(out, "model.safetensors")),
            json.loads(open(os.path.join(out, "config.json")).read()))


def reloaded(family: str, state: dict, native_config: dict, tmp_path):
    """The remote-named `state` renamed into the native family's names and loaded by transformers."""
    model_cls = getattr(transformers, REMOTE[family].native[1])
    save(tmp_path, to_native(family, state, native_config), native_config)
    model, info = model_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_remote_checkpoints_merge_as_their_native_ones(case, tmp_path):
    """task_arithmetic of two fine-tunes in the remote names equals it in the native names (renamed back) and
    reloads in transformers; a frankenmerge that repeats a layer writes its depth under the remote config's key (and
    per-layer lists of that length) and runs at that depth."""
    family, extra = case
    folders = checkpoints(family, extra, tmp_path, tuned=2)
    native_config = json.loads(open(os.path.join(folders[0][0], "config.json")).read())
    recipe = lambda side: {"merge_method": "task_arithmetic", "base_model": folders[0][side], "models": [
        {"model": f[side], "parameters": {"weight": 0.5}} for f in folders[1:]]}
    native, _ = merged(recipe(0), tmp_path / "native")
    remote, config = merged(recipe(1), tmp_path / "remote")
    assert config == json.loads(open(os.path.join(folders[0][1], "config.json")).read())
    renamed = to_native(family, remote, native_config)
    assert renamed.keys() == native.keys()
    for name, t in native.items():
        torch.testing.assert_close(renamed[name], t, rtol=0, atol=0, msg=name)
    reloaded(family, remote, native_config, tmp_path / "reloaded")

    sources = lambda layers: [{"model": folders[0][1], "layer_range": layers}]
    sliced, config = merged({"merge_method": "passthrough", "slices": [{"sources": sources([0, 2])},
                                                                       {"sources": sources([1, 2])}]}, tmp_path / "sliced")
    assert config[REMOTE[family].depth_key] == 3
    per_layer = [k for k, v in json.loads(open(os.path.join(folders[0][1], "config.json")).read()).items()
                 if isinstance(v, list) and len(v) == 2]  # per-layer lists (OpenELM's heads, Nemotron-NAS' blocks)
    assert all(len(config[k]) == 3 for k in per_layer), per_layer
    deeper = {k: v for k, v in native_config.items() if k != "layer_types"}  # Qwen2's: its config fills them in
    model = reloaded(family, sliced, {**deeper, "num_hidden_layers": 3}, tmp_path / "sliced_native")
    state = model.state_dict()
    assert all(torch.equal(t, state[n.replace("layers.2.", "layers.1.")]) for n, t in state.items() if "layers.2." in n)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 11).unsqueeze(0)).logits).all()


ROTATABLE = [f for f, r in REMOTE.items() if r.rotatable]


def turned(family: str, tmp_path, seed: int = 1) -> tuple[str, str]:
    """(a remote checkpoint, a copy of it whose residual stream the remote table alone turned)."""
    (_, remote), = checkpoints(family, {"tie_word_embeddings": False, **REMOTE[family].vocab}, tmp_path)
    config = json.loads(open(os.path.join(remote, "config.json")).read())
    state = {k: v.double() for k, v in safetensors_torch.load_file(os.path.join(remote, "model.safetensors")).items()}
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return remote, save(tmp_path / "turned", {k: v.float() for k, v in rotate(state, for_config(config), Q).items()},
                        config)


@pytest.mark.parametrize("family", ROTATABLE)
def test_a_turn_by_the_remote_table_keeps_the_native_function(family, tmp_path):
    """Turning the remote checkpoint's residual stream by its table alone, renamed back, leaves the native model's
    logits as they were (a wrong or missing role changes them by percents); SeMe aligns the turned copy back."""
    remote, rotated = turned(family, tmp_path)
    native_config = json.loads(open(tmp_path / "native0" / "config.json").read())
    load = lambda path, where: reloaded(family, safetensors_torch.load_file(os.path.join(path, "model.safetensors")),
                                        native_config, tmp_path / where)
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        expected, got = load(remote, "a")(ids).logits, load(rotated, "b")(ids).logits
    original = safetensors_torch.load_file(os.path.join(remote, "model.safetensors"))
    assert_aligned_back(expected, got, remote, rotated, original, tmp_path / "aligned")


def turned_checkpoint(state: dict, arch, config: dict, out) -> tuple[dict, str]:
    """`state` turned by `arch`'s roles with a fixed random rotation of the stream (in float64), and a checkpoint of it
    with `config` in `out`."""
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    turned = {k: v.float() for k, v in rotate({k: v.double() for k, v in state.items()}, arch, Q).items()}
    return turned, save(out, turned, config)


def task_arithmetic_halves(path: str, tuned: list[str], state: dict, config: dict, out) -> dict:
    """task_arithmetic of the `tuned` checkpoints, weight 0.5 each, onto `path` (its tensors `state`, its config
    `config`), in `out`: every tensor base + Σ 0.5 δ, the config kept. Returns the merged tensors."""
    merged_state, merged_config = merged({"merge_method": "task_arithmetic", "base_model": path,
                                          "models": [{"model": t, "parameters": {"weight": 0.5}} for t in tuned]}, out)
    assert merged_state.keys() == state.keys() and {**merged_config, "dtype": None} == {**config, "dtype": None}
    inputs = [safetensors_torch.load_file(os.path.join(t, "model.safetensors")) for t in tuned]
    for name, t in state.items():
        torch.testing.assert_close(merged_state[name], t + 0.5 * (inputs[0][name] - t) + 0.5 * (inputs[1][name] - t),
                                   msg=name)
    return merged_state


def assert_aligned_back(expected, got, pivot: str, turned: str, state: dict, out) -> None:
    """A turn by the table kept the logits (`expected` the model's, `got` its turned copy's), and SeMe merging the
    copy into the model (`pivot`, whose tensors are `state`) aligns it back: the merge, in `out`, is the model."""
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    assert seme_merge(pivot, [turned], out)["sources"][0]["applied"]
    aligned = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    assert aligned.keys() == state.keys()
    for name, t in state.items():
        torch.testing.assert_close(aligned[name], t.float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", [f for f, r in REMOTE.items() if not r.rotatable])
def test_seme_refuses_to_turn_a_family_that_cannot_in_one_line(family, tmp_path, capsys):
    remote, rotated = turned(family, tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": remote, "models": [{"model": rotated}]}))
    capsys.readouterr()  # what building the checkpoints printed
    assert main([str(recipe), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seme: error: SeMe: aligning {REMOTE[family].table}") and \
        "models by rotation is not supported" in err[0], err
    assert not (tmp_path / "refused").exists()


# Qwen-VL's vision tower (transformer.visual, vLLM's qwen_vl.py): a ViT of 2 blocks 8 wide on 2 x 2 patches of 2
# pixels, a resampler of 4 queries (of 2 heads here; the remote code gives output_dim // 128) over them, ln_post and proj
VISUAL = dict(width=8, layers=2, heads=2, mlp_ratio=2.0, image_size=4, patch_size=2, n_queries=4, output_dim=32)


def qwen_vl_tower(seed: int) -> dict:
    """A Qwen-VL vision tower's tensors, as its checkpoints name them, for VISUAL's shapes."""
    g = torch.Generator().manual_seed(seed)
    w, d, q, p = VISUAL["width"], VISUAL["output_dim"], VISUAL["n_queries"], VISUAL["patch_size"]
    shapes = {"conv1.weight": (w, 3, p, p), "positional_embedding": (q, w), "attn_pool.query": (q, d),
              "attn_pool.pos_embed": (q, d), "attn_pool.kv_proj.weight": (d, w),
              "attn_pool.attn.in_proj_weight": (3 * d, d),
              "attn_pool.attn.in_proj_bias": (3 * d,), "attn_pool.attn.out_proj.weight": (d, d),
              "attn_pool.attn.out_proj.bias": (d,), "proj": (d, d)}
    norms = {"ln_pre": w, "attn_pool.ln_q": d, "attn_pool.ln_kv": d, "ln_post": d}
    for i in range(VISUAL["layers"]):
        block = f"transformer.resblocks.{i}."
        norms.update({block + "ln_1": w, block + "ln_2": w})
        for name, (rows, cols) in (("attn.in_proj", (3 * w, w)), ("attn.out_proj", (w, w)), ("mlp.c_fc", (2 * w, w)),
                                   ("mlp.c_proj", (w, 2 * w))):
            shapes.update({block + name + ".weight": (rows, cols), block + name + ".bias": (rows,)})
    tower = {n: torch.randn(*shape, generator=g) * shape[-1] ** -0.5 for n, shape in shapes.items()}
    for n, width in norms.items():
        tower.update({n + ".weight": 1 + 0.3 * torch.randn(width, generator=g),
                      n + ".bias": 0.1 * torch.randn(width, generator=g)})
    return {"transformer.visual." + n: t for n, t in tower.items()}


def qwen_vl_image(state: dict, pixels) -> torch.Tensor:
    """Qwen-VL's image features as vLLM's qwen_vl.py computes them (VisionTransformer.forward, Resampler2 without
    post-projection): patches, the ViT's pre-LN blocks (query, key and value of each head side by side in
    attn.in_proj's rows), the resampler's queries attending over them, ln_post, then x @ proj."""
    F = torch.nn.functional
    v = lambda n: state["transformer.visual." + n]
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], v(n + ".weight"), v(n + ".bias"), 1e-6)
    linear = lambda x, n: F.linear(x, v(n + ".weight"), v(n + ".bias"))

    def attend(q, k, val, heads):  # [positions, width] each, heads side by side
        split = lambda t: t.reshape(t.shape[0], heads, -1).transpose(0, 1)
        out = F.scaled_dot_product_attention(split(q), split(k), split(val))
        return out.transpose(0, 1).reshape(q.shape[0], -1)

    x = F.conv2d(pixels, v("conv1.weight"), stride=VISUAL["patch_size"]).flatten(2).transpose(1, 2)[0]
    x = ln(x + v("positional_embedding"), "ln_pre")
    heads = VISUAL["heads"]
    for i in range(VISUAL["layers"]):
        block = f"transformer.resblocks.{i}."
        qkv = linear(ln(x, block + "ln_1"), block + "attn.in_proj").reshape(x.shape[0], heads, 3, -1)
        q, k, val = (qkv[:, :, j].reshape(x.shape[0], -1) for j in range(3))
        x = x + linear(attend(q, k, val, heads), block + "attn.out_proj")
        x = x + linear(F.gelu(linear(ln(x, block + "ln_2"), block + "mlp.c_fc")), block + "mlp.c_proj")
    kv = ln(x @ v("attn_pool.kv_proj.weight").T, "attn_pool.ln_kv")
    q = ln(v("attn_pool.query"), "attn_pool.ln_q") + v("attn_pool.pos_embed")
    wq, wk, wv = v("attn_pool.attn.in_proj_weight").chunk(3)
    bq, bk, bv = v("attn_pool.attn.in_proj_bias").chunk(3)
    pooled = attend(q @ wq.T + bq, (kv + v("attn_pool.pos_embed")) @ wk.T + bk, kv @ wv.T + bv, heads)
    pooled = pooled @ v("attn_pool.attn.out_proj.weight").T + v("attn_pool.attn.out_proj.bias")
    return ln(pooled, "ln_post") @ v("proj")


def test_qwen_vl_turns_with_its_vision_towers_proj(tmp_path):
    """Qwen-VL's checkpoints (QWenLMHeadModel too) keep a vision tower under transformer.visual: its proj (x @ proj)
    writes the image features into the stream, everything else in it is inner. Turned by qwen's table, a Qwen-VL
    checkpoint gives the logits of a prompt holding an image (its features, from the tower's forward transcribed from
    vLLM's, in the places of the image's pad tokens) it gave, SeMe aligns it back whole, and task_arithmetic merges
    the tower by name."""
    (native, remote), = checkpoints("qwen", {"tie_word_embeddings": False}, tmp_path)
    config = dict(json.loads(open(os.path.join(remote, "config.json")).read()), visual=VISUAL)
    state = {**safetensors_torch.load_file(os.path.join(remote, "model.safetensors")), **qwen_vl_tower(5)}
    save(remote, state, config)
    arch = for_config(config, state.keys())
    assert arch.name == "qwen" and arch.projected and not arch.rotation_obstacles()
    for name in state:
        if name.startswith("transformer.visual."):
            r = arch.role(name)
            proj = name == "transformer.visual.proj"
            assert (r.role, r.layout) == (("write", "in_out") if proj else ("inner", "out_in")), name
    turned_state, rotated = turned_checkpoint(state, arch, config, tmp_path / "turned")

    native_config = json.loads(open(os.path.join(native, "config.json")).read())
    ids = torch.tensor([[1, 5, 60, 61, 61, 61, 61, 62, 9]])  # the image's start, its 4 pad tokens, its end
    pixels = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def logits(tensors, where):
        model = reloaded("qwen", {k: v for k, v in tensors.items() if not k.startswith("transformer.visual.")},
                         native_config, tmp_path / where)
        embeds = model.get_input_embeddings()(ids)
        embeds[0, 3:7] = qwen_vl_image(tensors, pixels)
        return model(inputs_embeds=embeds).logits

    with torch.no_grad():
        expected, got = logits(state, "a"), logits(turned_state, "b")
    assert_aligned_back(expected, got, remote, rotated, state, tmp_path / "aligned")
    tower = qwen_vl_tower(5)
    out, _ = merged({"merge_method": "task_arithmetic", "base_model": remote,
                     "models": [{"model": rotated, "parameters": {"weight": 0.5}}]}, tmp_path / "merged")
    assert all(torch.equal(out[n], t) for n, t in tower.items() if n != "transformer.visual.proj")


def test_a_tower_its_own_table_does_not_describe_keeps_seme_from_turning_it(tmp_path, capsys):
    """A checkpoint whose own table (no text_config, not projected: EXAONE's) leaves a vision tower beside its language
    model undescribed, here Qwen-VL's transformer.visual under exaone's: other methods merge the tower by name; SeMe
    refuses to turn the language model without it (its proj would keep the source's coordinates), in one line that
    names it."""
    remote, rotated = turned("exaone", tmp_path)
    g = torch.Generator().manual_seed(5)
    tower = {"transformer.visual.ln_post.weight": torch.ones(32), "transformer.visual.proj": torch.randn(32, 32, generator=g)}
    for path in (remote, rotated):
        state = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
        save(path, {**state, **tower}, json.loads(open(os.path.join(path, "config.json")).read()))
    out, _ = merged({"merge_method": "task_arithmetic", "base_model": remote,
                     "models": [{"model": rotated, "parameters": {"weight": 0.5}}]}, tmp_path / "merged")
    assert all(torch.equal(out[n], t) for n, t in tower.items())
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": remote, "models": [{"model": rotated}]}))
    capsys.readouterr()
    assert main([str(recipe), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aligning exaone models by rotation is not supported (its role table does not describe " \
        "transformer.visual.ln_post.weight, transformer.visual.proj: a rotation" in err[0], err


def test_remote_configs_read_as_their_classes_read_them():
    """A setting a remote config leaves out takes its class's default: EXAONE's and MiniCPM's (MiniCPM-MoE's too) tie
    the head, InternLM's, InternLM2's, Qwen's and Baichuan's do not; EXAONE's depth is num_layers (num_hidden_layers,
    its alias, is not written back)."""
    for architecture, model_type, tied in (("ExaoneForCausalLM", "exaone", True), ("MiniCPMForCausalLM", "minicpm", True),
                                           ("InternLMForCausalLM", "internlm", False),
                                           ("InternLM2ForCausalLM", "internlm2", False), ("QWenLMHeadModel", "qwen", False),
                                           ("BaichuanForCausalLM", "baichuan", False)):
        config = {"architectures": [architecture], "model_type": model_type}
        assert for_config(config).tied(config) is tied, architecture
    moe = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "num_experts": 8}
    assert for_config(moe).tied(moe) and for_config(moe).variant.startswith('model_type="minicpm", num_experts')
    assert for_config({"architectures": ["ExaoneForCausalLM"]}).num_layers({"num_layers": 32, "num_hidden_layers": 30}) == 32


def test_baichuans_head_is_told_by_its_vocabulary():
    """Baichuan's configs do not say whether the remote code builds Baichuan 2's NormHead: as vLLM does, Baichuan 2
    is told by its 125696 tokens; only configs of Baichuan 1's 64000 tokens (7B's BaiChuanForCausalLM, 13B's
    BaichuanForCausalLM) are turned, any other is refused."""
    for architecture in ("BaichuanForCausalLM", "BaiChuanForCausalLM"):
        config = {"architectures": [architecture], "model_type": "baichuan"}
        assert not for_config({**config, "vocab_size": 64000}).rotation_obstacles()
        for tokens in (125696, 125697, 64001):
            assert "NormHead" in for_config({**config, "vocab_size": tokens}).rotation_obstacles()[0]


# InternVL-chat (InternVLChatModel, remote code: InternVL 1.5 to 2.5), whose config names its language model's settings
# llm_config: transformers' Qianfan-OCR keeps the same layout (language_model., vision_model.: InternViT's names, mlp1.),
# here with a Llama language model, renamed into InternLM2's names (InternVL 2's 2B, 8B and 26B)
QIANFAN = dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14), image_token_id=60, tie_word_embeddings=False)
CHAT = "language_model."


def chat_image_prompt() -> dict:  # 4 x 4 patches, shuffled into 2 x 2 image tokens
    return dict(input_ids=torch.tensor([[1, 5] + [60] * 4 + [9, 11]]),
                pixel_values=torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0)))


def internvl_chat(native: dict, config: dict) -> tuple[dict, dict]:
    """A Qianfan-OCR state dict and config.json (as transformers saves them) as InternVL-chat's: its language model
    renamed into InternLM2's names, its settings as InternLM2's remote config under llm_config."""
    text = {k[len(CHAT):].replace("model.encoder.layers.", "model.layers."): v for k, v in native.items()
            if k.startswith(CHAT)}
    state = {k: v for k, v in native.items() if not k.startswith(CHAT)}
    state.update((CHAT + k, v) for k, v in to_remote("internlm2", text, config["text_config"]).items())
    return state, {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
                   "llm_config": REMOTE["internlm2"].config(config["text_config"]),
                   "vision_config": dict(config["vision_config"], architectures=["InternVisionModel"],
                                         model_type="intern_vit_6b"),
                   "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "force_image_size": 56,
                   "template": "internlm2-chat", "tie_word_embeddings": False}


def qianfan(state: dict, config: dict, path) -> object:
    """An InternVL-chat state dict renamed back into Qianfan-OCR's names (the Hub's: language_model.model.layers.)
    and loaded by transformers with the Qianfan config `config`."""
    text = to_native("internlm2", {k[len(CHAT):]: v for k, v in state.items() if k.startswith(CHAT)},
                     config["text_config"])
    native = {k: v for k, v in state.items() if not k.startswith(CHAT)}
    native.update((CHAT + k, v) for k, v in text.items())
    save(path, native, config)
    model, info = transformers.QianfanOCRForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def chat_checkpoints(root, tuned: int = 0) -> tuple[dict, list[tuple[str, str]]]:
    """The Qianfan config and (Qianfan folder, InternVL-chat folder) of a perturbed model and `tuned` fine-tunes."""
    config = transformers.QianfanOCRConfig(text_config=dict(DECODER, model_type="llama"), **QIANFAN)
    torch.manual_seed(0)
    perturbed(transformers.QianfanOCRForConditionalGeneration(config)).save_pretrained(root / "native0")
    config = json.loads((root / "native0" / "config.json").read_text())
    state = safetensors_torch.load_file(root / "native0" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    folders = [(str(root / "native0"), save(root / "chat0", *internvl_chat(state, config)))]
    for k in range(1, tuned + 1):
        tuned_state = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in state.items()}
        folders.append((save(root / f"native{k}", tuned_state, config),
                        save(root / f"chat{k}", *internvl_chat(tuned_state, config))))
    return config, folders


def assert_chat_roles(arch, own, names) -> None:
    """InternVL-chat's tensors `names` have, under language_model., the roles `own` (its language model's table) gives
    them there; mlp1.3 writes, the tower and the projector's first layers are inner."""
    for name in names:
        r = arch.role(name)
        if name.startswith(CHAT):
            o = own.role(name[len(CHAT):])
            assert (r.role, r.layer, r.norm) == (o.role, o.layer, o.norm and CHAT + o.norm), name
        else:
            assert r.role == {"mlp1.3.weight": "write", "mlp1.3.bias": "write_bias"}.get(name, "inner"), name


def test_internvl_chat_takes_its_language_models_table_from_llm_config(tmp_path):
    """InternVL-chat's language model has InternLM2's roles under language_model., its settings read from llm_config;
    mlp1.3 writes the image features into the stream, the vision tower and the projector's first layers are inner."""
    _, ((_, chat),) = chat_checkpoints(tmp_path)
    config = json.loads(open(os.path.join(chat, "config.json")).read())
    names = safetensors_torch.load_file(os.path.join(chat, "model.safetensors")).keys()
    arch, own = for_config(config, names), for_config(config["llm_config"])
    assert (arch.name, arch.variant, arch.settings_key, arch.projected) == ("internlm2", "in InternVLChatModel",
                                                                            "llm_config", True)
    assert arch.num_layers(config) == 2 and arch.hidden_size(config) == 32 and not arch.tied(config)
    assert not arch.rotation_obstacles()
    assert_chat_roles(arch, own, names)


def test_internvl_chat_turns_with_its_projector_and_merges(tmp_path):
    """Turned by its roles, an InternVL-chat checkpoint renamed back gives Qianfan-OCR the logits of a prompt with an
    image it gave (the projector's write turns with the stream) and SeMe aligns it back; task_arithmetic of two
    fine-tunes equals Qianfan-OCR's merge renamed back; a frankenmerge of its language model alone writes the new
    depth into llm_config and reads an image."""
    config, folders = chat_checkpoints(tmp_path, tuned=2)
    chat = folders[0][1]
    chat_config = json.loads(open(os.path.join(chat, "config.json")).read())
    state = {k: v.double() for k, v in safetensors_torch.load_file(os.path.join(chat, "model.safetensors")).items()}
    arch = for_config(chat_config, state.keys())
    _, rotated = turned_checkpoint(state, arch, chat_config, tmp_path / "turned")
    load = lambda path, where: qianfan(safetensors_torch.load_file(os.path.join(path, "model.safetensors")), config,
                                       tmp_path / where)
    with torch.no_grad():
        expected, got = (load(p, w)(**chat_image_prompt()).logits for p, w in ((chat, "a"), (rotated, "b")))
    assert_aligned_back(expected, got, chat, rotated, state, tmp_path / "aligned")

    recipe = lambda side: {"merge_method": "task_arithmetic", "base_model": folders[0][side], "models": [
        {"model": f[side], "parameters": {"weight": 0.5}} for f in folders[1:]]}
    native, _ = merged(recipe(0), tmp_path / "native")
    remote, _ = merged(recipe(1), tmp_path / "remote")
    qianfan(remote, config, tmp_path / "reloaded")
    renamed = safetensors_torch.load_file(tmp_path / "reloaded" / "model.safetensors")
    hub = lambda name: name.replace(CHAT + "model.encoder.layers.", CHAT + "model.layers.")  # how Qianfan saves its own
    assert renamed.keys() == set(map(hub, native))
    for name, t in native.items():
        torch.testing.assert_close(renamed[hub(name)], t, rtol=0, atol=0, msg=name)

    sliced, sliced_config = merged({"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": chat, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": chat, "layer_range": [1, 2]}]}]},
        "vision_tower": {"models": [chat]}, "multi_modal_projector": {"models": [chat]}}}, tmp_path / "sliced")
    assert sliced_config["llm_config"]["num_hidden_layers"] == 3
    assert sliced_config["vision_config"]["num_hidden_layers"] == 2
    deeper = dict(config, text_config={k: v for k, v in config["text_config"].items() if k != "layer_types"})
    deeper["text_config"]["num_hidden_layers"] = 3
    with torch.no_grad():
        assert torch.isfinite(qianfan(sliced, deeper, tmp_path / "deeper")(**chat_image_prompt()).logits).all()


def test_an_output_vocabulary_sizes_internvl_chats_llm_config():
    """InternVL-chat's vocabulary is its llm_config's: a new output vocabulary is written there, and read from there."""
    from types import SimpleNamespace

    from seme.vocabulary import Remap, vocab_size

    remap = Remap(size=130, tokens=130, rows={0: [*range(3, 128), 0, 1, 2, -1, -1]}, reference=0,
                  base_tokens={i: f"w{i}" for i in range(128)})
    config = {"architectures": ["InternVLChatModel"], "llm_config": {"vocab_size": 128, "bos_token_id": 1},
              "vision_config": {"num_hidden_layers": 2}}
    out = remap.config(config)
    assert out["llm_config"] == {"vocab_size": 130, "bos_token_id": 126} and out["vision_config"] == config["vision_config"]
    assert vocab_size(SimpleNamespace(config=config)) == 128


# Phi-3-vision / Phi-3.5-vision (Phi3VForCausalLM, remote code): transformers' Phi-3 beside its CLIPVisionModel, as
# the remote code composes them (model.vision_embed_tokens.img_processor), here a CLIP of 2 layers on 8 x 8 pixels in
# 4 x 4 patches, whose 2 x 2 merged features (4 x 16 channels) img_projection maps into the stream
PHI3_V = "model.vision_embed_tokens."
# (transformers 4's CLIPVisionModel names, which the remote code's checkpoints keep; transformers 5 drops vision_model.)
CLIP_NAMES = PHI3_V + "img_processor.vision_model."
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=2)


def phi3_v_checkpoint(path, seed: int = 0, tuned: int | None = None) -> tuple[str, dict]:
    """A Phi-3-vision checkpoint (a perturbed Phi-3 and CLIP composed as the remote code names them, its projector and
    separators random; `tuned`: a fine-tune of it, small deltas of that seed) and its Phi-3 config."""
    torch.manual_seed(seed)
    text = perturbed(transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)))
    vision = perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)))
    g = torch.Generator().manual_seed(seed)
    state = {**text.state_dict(), **{CLIP_NAMES + k: v for k, v in vision.state_dict().items()},
             PHI3_V + "glb_GN": torch.randn(1, 1, 64, generator=g), PHI3_V + "sub_GN": torch.randn(1, 1, 1, 64, generator=g),
             **{PHI3_V + f"img_projection.{i}.{p}": torch.randn(*shape, generator=g) * 0.2
                for i, width in ((0, 64), (2, 32)) for p, shape in (("weight", (32, width)), ("bias", (32,)))}}
    if tuned is not None:
        g = torch.Generator().manual_seed(tuned)
        state = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in state.items()}
    native = text.config.to_dict()
    config = {**native, "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v",
              "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                             "use_hd_transform": True, "with_learnable_separator": True},
              "img_processor": {"image_dim_out": 16, "model_name": "openai/clip-vit-large-patch14-336",
                                "name": "clip_vision_model", "num_img_tokens": 144}}
    return save(path, state, config), native


def phi3_v_logits(state: dict, native: dict, ids, pixels) -> torch.Tensor:
    """Phi-3-vision's logits of a prompt holding one image of one crop (its image tokens: 6 of the crop's features, 2
    rows of 2 and sub_GN after each, glb_GN, 6 of the global image's), as its remote code computes them (vLLM's
    phi3v.py Phi3HDImageEmbedding, its 24 x 24 patches here 4 x 4): Phi-3 and CLIP by transformers, the glue transcribed."""
    text = transformers.Phi3ForCausalLM(transformers.Phi3Config(**native)).eval()
    text.load_state_dict({k: v for k, v in state.items() if not k.startswith(PHI3_V)})
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)).eval()
    vision.load_state_dict({k[len(CLIP_NAMES):]: v for k, v in state.items() if k.startswith(CLIP_NAMES)})
    features = vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # layer_idx -2, patches only
    crops, _, channels = features.shape
    merged = (features.reshape(crops, 2, 2, 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
              .reshape(crops, 2, 2, 4 * channels))  # 2 x 2 patches into channels: one crop 2 rows of 2
    rows = lambda crop: torch.cat([crop, state[PHI3_V + "sub_GN"][0].expand(2, 1, -1)], 1).reshape(-1, 4 * channels)
    image = torch.cat([rows(merged[1]), state[PHI3_V + "glb_GN"][0], rows(merged[0])])  # crops, glb_GN, global
    linear = lambda x, i: x @ state[PHI3_V + f"img_projection.{i}.weight"].T + state[PHI3_V + f"img_projection.{i}.bias"]
    embeds = text.get_input_embeddings()(ids)
    embeds[ids == 100] = linear(torch.nn.functional.gelu(linear(image, 0)), 2)
    return text(inputs_embeds=embeds).logits


PHI3_V_IDS = torch.tensor([[1, 5] + [100] * 13 + [9, 11]])
PHI3_V_PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the global image, its one crop


def test_phi3_v_has_phi3s_roles_and_its_projectors_write(tmp_path):
    """Phi-3-vision's decoder has Phi-3's roles (its settings the config's own); img_projection.2 writes the image
    features into the stream, everything else in vision_embed_tokens (CLIP, img_projection.0, the separators glb_GN and
    sub_GN, in the projector's input channels) is inner."""
    path, native = phi3_v_checkpoint(tmp_path / "a")
    config = json.loads(open(os.path.join(path, "config.json")).read())
    names = safetensors_torch.load_file(os.path.join(path, "model.safetensors")).keys()
    arch, phi3 = for_config(config, names), for_config(native)
    assert (arch.name, phi3.name, arch.projected, arch.num_layers(config), arch.hidden_size(config)) == \
        ("phi3_v", "phi3", True, 2, 32) and not arch.rotation_obstacles() and not arch.tied(config)
    for name in names:
        r = arch.role(name)
        if name.startswith(PHI3_V):
            assert r.role == {PHI3_V + "img_projection.2.weight": "write",
                              PHI3_V + "img_projection.2.bias": "write_bias"}.get(name, "inner"), name
            assert arch.beside_language(name), name
        else:
            n = phi3.role(name)
            assert (r.role, r.layer, r.norm, r.tied_to) == (n.role, n.layer, n.norm, n.tied_to), name


def test_phi3_v_turns_with_its_projector_and_merges(tmp_path):
    """Turned by its table, a Phi-3-vision checkpoint keeps the logits of a prompt holding an image, SeMe aligns the
    turned copy back, and task_arithmetic of two fine-tunes merges every tensor where the model keeps it and reads an
    image."""
    path, native = phi3_v_checkpoint(tmp_path / "a")
    config = json.loads(open(os.path.join(path, "config.json")).read())
    state = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    turned_state, rotated = turned_checkpoint(state, for_config(config, state.keys()), config, tmp_path / "turned")
    with torch.no_grad():
        expected, got = (phi3_v_logits(s, native, PHI3_V_IDS, PHI3_V_PIXELS) for s in (state, turned_state))
    assert_aligned_back(expected, got, path, rotated, state, tmp_path / "aligned")

    tuned = [phi3_v_checkpoint(tmp_path / f"tuned{k}", tuned=k)[0] for k in (1, 2)]
    out = task_arithmetic_halves(path, tuned, state, config, tmp_path / "ta")
    with torch.no_grad():
        assert torch.isfinite(phi3_v_logits(out, native, PHI3_V_IDS, PHI3_V_PIXELS)).all()


def test_phi3_v_tower_slices_have_no_depth_to_change(tmp_path, capsys):
    """Phi-3-vision's config keeps no depth of its CLIP tower (img_processor names the tower, not its layers): slices
    that change the tower's depth are refused in one line, rather than writing it under the language model's
    num_hidden_layers (which the tiny tower's depth equals here)."""
    import yaml

    path, _ = phi3_v_checkpoint(tmp_path / "a")
    recipe = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "vision_tower": {"slices": [{"sources": [{"model": path, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": path, "layer_range": [1, 2]}]}]},
        "text_decoder": {"slices": [{"sources": [{"model": path, "layer_range": [0, 2]}]}]},
        "multi_modal_projector": {"models": [{"model": path}]}}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        "seme: error: modules.vision_tower: config.json of a has no depth of 2 for its vision_tower to change")
    assert not (tmp_path / "out").exists()


# Nemotron-NAS's heterogeneous layers (block_configs): a Llama whose blocks the remote code (DeciLMDecoderLayer) builds
# per entry: no attention (nor input_layernorm), or one Linear in its place; no MLP (nor post_attention_layernorm), or
# one Linear in its place; each block of its own key-value heads and MLP width
class DeciLinear(torch.nn.Module):
    """The remote code's DeciLMLinearAttention / DeciLMLinearMLP: one [d, d] Linear without bias, named `name`."""

    def __init__(self, name: str, width: int, attention: bool):
        super().__init__()
        self.name, self.attention = name, attention
        setattr(self, name, torch.nn.Linear(width, width, bias=False))

    def forward(self, hidden_states, **_):
        out = getattr(self, self.name)(hidden_states)
        return (out, None) if self.attention else out


class Skipped(torch.nn.Module):
    """A no_op sublayer: the layer adds nothing (its norm: none, Identity)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, **_):
        zero = torch.zeros_like(hidden_states)
        return (zero, None) if self.attention else zero


def nemotron_nas(native: dict, blocks: list[dict]):
    """Nemotron-NAS's forward, transcribed (DeciLMDecoderLayer.forward): a LlamaForCausalLM whose layer i is built by
    blocks[i]; each sublayer adds its output of its norm's output to the stream, or is skipped with its norm."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(native, num_hidden_layers=len(blocks))))
    d = native["hidden_size"]
    for layer, block in zip(model.model.layers, blocks):
        attention, ffn = block["attention"], block["ffn"]
        if attention["no_op"]:
            layer.input_layernorm, layer.self_attn = torch.nn.Identity(), Skipped(attention=True)
        elif attention["replace_with_linear"]:
            layer.self_attn = DeciLinear("linear_attn", d, attention=True)
        else:
            own = transformers.LlamaConfig(**dict(native, num_key_value_heads=native["num_attention_heads"] //
                                                  attention["n_heads_in_group"]))
            layer.self_attn = transformers.models.llama.modeling_llama.LlamaAttention(own, layer.self_attn.layer_idx)
        if ffn["no_op"]:
            layer.post_attention_layernorm, layer.mlp = torch.nn.Identity(), Skipped(attention=False)
        elif ffn["replace_with_linear"]:
            layer.mlp = DeciLinear("linear_mlp", d, attention=False)
        else:
            width = -(-int(2 * ffn["ffn_mult"] * d / 3) // 256) * 256
            layer.mlp = transformers.models.llama.modeling_llama.LlamaMLP(
                transformers.LlamaConfig(**dict(native, intermediate_size=width)))
    return model.eval()


def nemotron_nas_logits(state: dict, config: dict, native: dict, ids) -> torch.Tensor:
    model = nemotron_nas(native, config["block_configs"])
    model.load_state_dict(state)  # strict: every tensor the blocks have, and no other
    return model(ids).logits


def nemotron_nas_checkpoint(path, seed: int = 0) -> tuple[str, dict, dict]:
    """A Nemotron-NAS checkpoint of four unlike blocks: Llama (2 query heads per key-value head, ffn_mult 12: 256
    wide); no attention and a linear MLP; a linear attention and no MLP; Llama (4 per key-value head, ffn_mult 18:
    512 wide). Its folder, config and the native Llama config its blocks start from."""
    torch.manual_seed(seed)
    base = transformers.LlamaConfig(**DECILM, tie_word_embeddings=False)
    native = json.loads(base.to_json_string())
    blocks = [decilm_block(native), decilm_block(native, attention_no_op=True, ffn_replace_with_linear=True),
              decilm_block(native, attention_replace_with_linear=True, ffn_no_op=True),
              decilm_block(native, heads_in_group=4, ffn_mult=18.0)]
    config = dict(decilm_config(native), num_hidden_layers=4, block_configs=blocks)
    model = perturbed(nemotron_nas(native, blocks))
    return save(path, model.state_dict(), config), config, native


def test_nemotron_nas_blocks_take_their_kinds_roles(tmp_path):
    """Each layer's block_configs entry says which tensors it has: a no_op sublayer has none (nor its norm), a
    replace_with_linear one its Linear, which reads its norm's output and writes into the stream (stream_map)."""
    path, config, _ = nemotron_nas_checkpoint(tmp_path / "a")
    names = safetensors_torch.load_file(os.path.join(path, "model.safetensors")).keys()
    arch = for_config(config, names)
    assert (arch.name, arch.kinds) == ("decilm", ("", "attention.no_op+ffn.replace_with_linear",
                                                  "attention.replace_with_linear+ffn.no_op", ""))
    assert not arch.rotation_obstacles() and arch.num_layers(config) == 4
    llama = for_config({"architectures": ["LlamaForCausalLM"]})
    for name in names:
        r = arch.role(name)
        if "linear_" in name:
            norm = "input_layernorm" if "linear_attn" in name else "post_attention_layernorm"
            assert (r.role, r.norm) == ("stream_map", f"model.layers.{r.layer}.{norm}.weight"), name
        else:
            n = llama.role(name)
            assert (r.role, r.layer, r.norm, r.tied_to) == (n.role, n.layer, n.norm, n.tied_to), name
    for layer in range(4):  # every tensor the layer's kinds give it is in the checkpoint, and only those
        have = {n for n in names if n.startswith(f"model.layers.{layer}.")}
        templates = {t for t, s in arch.tensors.items() if "{layer}" in t and not s.optional}
        for kind in arch.kinds[layer].split("+"):
            for t, s in arch.kind_tensors.get(kind, {}).items():
                templates.discard(t) if s is None else templates.add(t)
        assert have == {arch.layer_name(t, layer) for t in templates}, layer
    assert arch.role("model.layers.1.input_layernorm.weight") is None
    assert arch.role("model.layers.0.self_attn.linear_attn.weight") is None


def test_nemotron_nas_turns_and_its_slices_take_their_blocks(tmp_path):
    """Turned by its table, a Nemotron-NAS checkpoint of unlike blocks keeps its logits (its linear replacements fold
    their norms' gains) and SeMe aligns it back; a frankenmerge that reorders its layers writes their block_configs
    entries in the new order, and runs at that depth."""
    path, config, native = nemotron_nas_checkpoint(tmp_path / "a")
    state = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    turned_state, rotated = turned_checkpoint(state, for_config(config, state.keys()), config, tmp_path / "turned")
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        expected, got = (nemotron_nas_logits(s, config, native, ids) for s in (state, turned_state))
    assert_aligned_back(expected, got, path, rotated, state, tmp_path / "aligned")

    sliced, sliced_config = merged({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": path, "layer_range": [2, 4]}]}, {"sources": [{"model": path, "layer_range": [0, 3]}]}]},
        tmp_path / "sliced")
    order = [2, 3, 0, 1, 2]
    assert sliced_config["num_hidden_layers"] == 5
    assert sliced_config["block_configs"] == [config["block_configs"][i] for i in order]
    renamed = {n.replace(f"layers.{j}.", f"layers.{i}."): t for i, j in enumerate(order) for n, t in state.items()
               if n.startswith(f"model.layers.{j}.")}
    assert sliced.keys() == {n for n in state if ".layers." not in n} | renamed.keys()
    assert all(torch.equal(sliced[n], t) for n, t in renamed.items())
    with torch.no_grad():
        assert torch.isfinite(nemotron_nas_logits(sliced, sliced_config, native, ids)).all()


# DeepSeek-MoE v1 (DeepseekForCausalLM, remote code; deepseek_v2's table, its variant without latent attention):
# transformers' DeepSeek-OCR 2 language model (multi-head attention, a dense MLP, then a mixture of experts of softmax
# scores with shared experts: v1's with norm_topk_prob false), whose experts transformers fuses where v1's checkpoints
# keep one tensor per expert; DeepseekOcr2TextModel has no head: one beside it
DEEPSEEK_V1 = dict(DECODER, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)


def deepseek_v1_names(native: dict) -> dict:
    """DeepSeek-OCR 2's language model (and a head) in DeepSeek-MoE v1's names: under model., one tensor per expert
    (gate_up_proj's rows the gate's, then the up projection's, as DeepseekOcr2TextExperts chunks them)."""
    out = {}
    for name, t in native.items():
        stem, _, last = name.rpartition(".")
        if stem.endswith(".experts") and last in ("gate_up_proj", "down_proj"):
            for e, w in enumerate(t):
                parts = zip(("gate_proj", "up_proj"), w.chunk(2)) if last == "gate_up_proj" else [(last, w)]
                out.update({f"model.{stem}.{e}.{p}.weight": x for p, x in parts})
        else:
            out[name if name == "lm_head.weight" else "model." + name] = t
    return out


def deepseek_v1_native(state: dict) -> dict:
    """The inverse of deepseek_v1_names, without the head."""
    out, experts = {}, {}
    for name, t in state.items():
        stem, e, rest = (name.split(".experts.", 1)[0], *name.split(".experts.", 1)[1].split(".", 1)) \
            if ".experts." in name else (None, None, None)
        if stem:
            experts.setdefault((stem[len("model."):], rest), {})[int(e)] = t
        elif name != "lm_head.weight":
            out[name[len("model."):]] = t
    for (stem, rest), ts in experts.items():
        if rest == "down_proj.weight":
            out[stem + ".experts.down_proj"] = torch.stack([ts[e] for e in sorted(ts)])
        elif rest == "gate_proj.weight":
            ups = experts[(stem, "up_proj.weight")]
            out[stem + ".experts.gate_up_proj"] = torch.stack([torch.cat([ts[e], ups[e]]) for e in sorted(ts)])
    return out


def deepseek_v1_logits(state: dict, native: dict, ids) -> torch.Tensor:
    body = transformers.DeepseekOcr2TextModel(transformers.DeepseekOcr2TextConfig(**native)).eval()
    body.load_state_dict(deepseek_v1_native(state))  # strict: every tensor, and no other
    return body(ids).last_hidden_state @ state["lm_head.weight"].T


def deepseek_v1_checkpoint(path, tuned: int | None = None) -> tuple[str, dict, dict]:
    """A DeepSeek-MoE v1 checkpoint (a dense layer, then experts; `tuned`: a fine-tune of it, small deltas), its
    config and the native DeepSeek-OCR 2 language model's."""
    torch.manual_seed(0)
    body = perturbed(transformers.DeepseekOcr2TextModel(transformers.DeepseekOcr2TextConfig(
        **DEEPSEEK_V1, mlp_layer_types=["dense", "sparse"])))
    g = torch.Generator().manual_seed(4)
    state = deepseek_v1_names({**body.state_dict(), "lm_head.weight": torch.randn(128, 32, generator=g) * 0.2})
    state = {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in state.items()}  # the router's zeros too
    if tuned is not None:
        g = torch.Generator().manual_seed(tuned)
        state = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in state.items()}
    native = body.config.to_dict()
    config = remote_config(native, architectures=["DeepseekForCausalLM"], model_type="deepseek", num_hidden_layers=2,
                           **{k: native[k] for k in ("num_key_value_heads", "intermediate_size", "moe_intermediate_size",
                                                     "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                                                     "rms_norm_eps")},
                           first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
                           hidden_act="silu", rope_theta=10000.0, attention_bias=False, tie_word_embeddings=False)
    return save(path, state, config), config, native


def test_deepseek_moe_v1_has_deepseek_v2s_roles_turns_and_merges(tmp_path):
    """DeepSeek-MoE v1's checkpoints take deepseek_v2's variant without latent attention: q/k/v read input_layernorm,
    the dense MLP, the router, each expert's and the shared experts' gate / up read post_attention_layernorm, o_proj
    and the down projections write. Turned by that table, a checkpoint keeps its logits (run by DeepSeek-OCR 2's
    language model) and SeMe aligns it back; task_arithmetic of two fine-tunes merges every tensor by name and runs;
    a frankenmerge that repeats the experts' layer runs at its depth."""
    path, config, native = deepseek_v1_checkpoint(tmp_path / "a")
    state = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    arch = for_config(config, state.keys())
    assert (arch.label, arch.num_layers(config), arch.tied(config)) == ("deepseek_v2 (kv_lora_rank=null)", 2, False)
    assert not arch.rotation_obstacles()
    for name in state:
        r = arch.role(name)
        layer = name.split(".")[2] if ".layers." in name else None
        attention = ".self_attn." in name
        expected = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head",
                    "model.norm.weight": "final_norm"}.get(name) or \
            ("norm" if "layernorm" in name else "write" if "o_proj" in name or "down_proj" in name else "read")
        norm = f"model.layers.{layer}.{'input' if attention else 'post_attention'}_layernorm.weight"
        assert (r.role, r.norm) == (expected, norm if expected == "read" else None), name
    assert any(".experts.3.up_proj" in n for n in state) and "model.layers.1.mlp.gate.weight" in state

    turned_state, rotated = turned_checkpoint(state, arch, config, tmp_path / "turned")
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        expected, got = (deepseek_v1_logits(s, native, ids) for s in (state, turned_state))
    assert_aligned_back(expected, got, path, rotated, state, tmp_path / "aligned")

    tuned = [deepseek_v1_checkpoint(tmp_path / f"tuned{k}", tuned=k)[0] for k in (1, 2)]
    out = task_arithmetic_halves(path, tuned, state, config, tmp_path / "ta")
    with torch.no_grad():
        assert torch.isfinite(deepseek_v1_logits(out, native, ids)).all()

    sliced, sliced_config = merged({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": path, "layer_range": [0, 2]}]}, {"sources": [{"model": path, "layer_range": [1, 2]}]}]},
        tmp_path / "sliced")
    assert sliced_config["num_hidden_layers"] == 3
    assert all(torch.equal(t, sliced[n.replace("layers.2.", "layers.1.")]) for n, t in sliced.items() if "layers.2." in n)
    deeper = dict(native, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"])
    with torch.no_grad():
        assert torch.isfinite(deepseek_v1_logits(sliced, deeper, ids)).all()
