"""Families whose Hub checkpoints need trust_remote_code (their modelling code lives on the Hub), tested without it.

Most are a transformers-native family under other names (REMOTE): a tiny native model is saved in the remote
checkpoints' names, layout and config (the mapping below, read from the remote code), and seme's table for the remote
names must give every tensor its native counterpart's role. The others (TRANSCRIBED) have no native counterpart: their
forward is transcribed from the remote code in a few lines, in the checkpoints' names, and each read must take its
norm's output and each layer add its writes to the stream. Either way the table claims every name mergekit's
definition lists, task_arithmetic merges and slices of the checkpoints reload (converted back where native) and equal
the same merges of the native checkpoints, and SeMe aligns a rotated copy back or refuses it in one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

import seme
from bench.zoo import rotate  # the residual stream turned by the role table alone
from seme.architectures import for_config
from seme.errors import SemeError
from seme.merge import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from test_architectures import perturbed  # noqa: E402
from test_seme import seme_merge  # noqa: E402


# --- families that are a native one under other names -------------------------------------------------------------

@dataclass(frozen=True)
class Remote:
    """A remote-code family as a native one under other names."""
    native: tuple[str, str, dict]  # config class, causal LM class, a tiny model's settings
    config: Callable[[dict], dict]  # the remote config.json of a native config.json
    # (remote module, its native modules, the rows of each in the remote one by the native config): a module of
    # several native ones fuses them along its rows, in that order
    modules: tuple[tuple[str, tuple[str, ...], Callable[[dict], list[int]] | None], ...]
    buffers: Callable[[dict], dict] = lambda config: {}  # what only the remote checkpoints hold, by the remote config
    mergekit: str = ""  # mergekit's definition of the family
    forward: Callable | None = None  # (model, ids, remote config) -> logits, where the remote code runs it otherwise


def _glm_config(c: dict) -> dict:
    """ChatGLM's config.json (GLM-4-9B's keys) of a native Glm one."""
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": c["num_hidden_layers"],
            "num_hidden_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
            "ffn_hidden_size": c["intermediate_size"], "kv_channels": c["head_dim"],
            "num_attention_heads": c["num_attention_heads"], "multi_query_attention": True,
            "multi_query_group_num": c["num_key_value_heads"], "padded_vocab_size": c["vocab_size"],
            "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False, "layernorm_epsilon": c["rms_norm_eps"],
            "rope_ratio": 1, "original_rope": True, "seq_length": c["max_position_embeddings"],
            "tie_word_embeddings": False, "torch_dtype": "float32"}


def _glm_inv_freq(c: dict) -> dict:
    """RotaryEmbedding(kv_channels // 2)'s persistent buffer (it rotates half of each head's channels)."""
    dim = c["kv_channels"] // 2
    return {"transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))}


def _solar_config(c: dict) -> dict:
    """Solar Pro's config.json of a native Llama one: both kept states blended into layer 1, the first kept
    before layer 0, the second before layer 1."""
    return dict(c, architectures=["SolarForCausalLM"], model_type="solar", bskcn_1=[0], bskcn_2=[1], bskcn_3=[1],
                bskcn_4=[1], bskcn_tv=[0.9, 0.8], sliding_window=2047)


def _solar_forward(model, ids, c: dict):
    """SolarModel.forward on the Llama layers: before the layers bskcn_1 / bskcn_2 list the stream is kept, before
    those bskcn_3 / bskcn_4 list it becomes bskcn_tv * kept + (1 - bskcn_tv) * stream (inference's bskcn_tv[1])."""
    m, tv, kept = model.model, c["bskcn_tv"][1], {}
    h = m.embed_tokens(ids)
    rope = m.rotary_emb(h, torch.arange(ids.shape[1])[None])
    for i, layer in enumerate(m.layers):
        for slot in (1, 2):
            kept[slot] = h if i in c[f"bskcn_{slot}"] else kept.get(slot)
        for slot in (1, 2):
            h = kept[slot] * tv + h * (1 - tv) if i in c[f"bskcn_{slot + 2}"] else h
        h = layer(h, position_embeddings=rope)  # sdpa runs it causal without a mask
    return model.lm_head(m.norm(h))


def _phi_msft_config(c: dict) -> dict:
    """Phi-2's config.json from before transformers ported it (Microsoft's remote code) of a native Phi one."""
    return {"architectures": ["PhiForCausalLM"], "model_type": "phi-msft", "n_embd": c["hidden_size"],
            "n_layer": c["num_hidden_layers"], "n_head": c["num_attention_heads"], "n_head_kv": None,
            "n_inner": c["intermediate_size"], "rotary_dim": int(c["hidden_size"] // c["num_attention_heads"]
                                                                 * c["rope_parameters"]["partial_rotary_factor"]),
            "vocab_size": c["vocab_size"], "n_positions": c["max_position_embeddings"],
            "layer_norm_epsilon": c["layer_norm_eps"], "activation_function": "gelu_new", "tie_word_embeddings": False,
            "torch_dtype": "float32"}


PHI_MSFT_LAYER = "transformer.h.{layer}."
GLM_LAYER = "transformer.encoder.layers.{layer}."
REMOTE = {
    # ChatGLM2 / ChatGLM3 / GLM-4-9B: transformers' glm ports them (convert_glm_weights_to_hf.py's renames, the fused
    # query_key_value split as SelfAttention.forward splits it: the query heads, the key groups, the value groups)
    "chatglm": Remote(
        ("GlmConfig", "GlmForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                                             attention_bias=True, pad_token_id=0, eos_token_id=2)),
        _glm_config,
        (("transformer.embedding.word_embeddings", ("model.embed_tokens",), None),
         (GLM_LAYER + "input_layernorm", ("model.layers.{layer}.input_layernorm",), None),
         (GLM_LAYER + "self_attention.query_key_value", tuple(f"model.layers.{{layer}}.self_attn.{p}_proj" for p in "qkv"),
          lambda c: [c["num_attention_heads"] * c["head_dim"]] + 2 * [c["num_key_value_heads"] * c["head_dim"]]),
         (GLM_LAYER + "self_attention.dense", ("model.layers.{layer}.self_attn.o_proj",), None),
         (GLM_LAYER + "post_attention_layernorm", ("model.layers.{layer}.post_attention_layernorm",), None),
         (GLM_LAYER + "mlp.dense_h_to_4h", ("model.layers.{layer}.mlp.gate_up_proj",), None),  # gate, then up: as glm's
         (GLM_LAYER + "mlp.dense_4h_to_h", ("model.layers.{layer}.mlp.down_proj",), None),
         ("transformer.encoder.final_layernorm", ("model.norm",), None),
         ("transformer.output_layer", ("lm_head",), None)),
        _glm_inv_freq, "chatglm"),
    # Solar Pro: Llama's tensors and names, its block skip connections config lists
    "solar": Remote(("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, pad_token_id=0, tie_word_embeddings=False)), _solar_config, (), mergekit="solar",
        forward=_solar_forward),
    # Phi-2 / Phi-1.5 before transformers ported them: transformers' phi (convert_phi_weights_to_hf.py's renames; Wqkv
    # split as MHA splits it: query, key and value heads in turn)
    "phi:phi-msft": Remote(("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        partial_rotary_factor=0.5, pad_token_id=0, tie_word_embeddings=False)), _phi_msft_config,
        (("transformer.embd.wte", ("model.embed_tokens",), None),
         (PHI_MSFT_LAYER + "ln", ("model.layers.{layer}.input_layernorm",), None),
         (PHI_MSFT_LAYER + "mixer.Wqkv", tuple(f"model.layers.{{layer}}.self_attn.{p}_proj" for p in "qkv"),
          lambda c: 3 * [c["hidden_size"]]),
         (PHI_MSFT_LAYER + "mixer.out_proj", ("model.layers.{layer}.self_attn.dense",), None),
         (PHI_MSFT_LAYER + "mlp.fc1", ("model.layers.{layer}.mlp.fc1",), None),
         (PHI_MSFT_LAYER + "mlp.fc2", ("model.layers.{layer}.mlp.fc2",), None),
         ("lm_head.ln", ("model.final_layernorm",), None),
         ("lm_head.linear", ("lm_head",), None)), mergekit="phi2-old"),
}


def _pattern(module: str) -> re.Pattern:
    """A module template's tensors: its name, the layer where it has {layer}, then a parameter."""
    return re.compile("^" + re.escape(module).replace(r"\{layer\}", r"(?P<layer>\d+)") + r"\.(?P<param>\w+)$")


def _filled(module: str, m: re.Match) -> str:
    return (module.replace("{layer}", m["layer"]) if "{layer}" in module else module) + "." + m["param"]


def native_names(family: str, name: str) -> list[str]:
    """The native tensors a remote one holds (none: a buffer only the remote checkpoints keep; itself where the
    family keeps the native names)."""
    if not REMOTE[family].modules:
        return [name]
    for remote, natives, _ in REMOTE[family].modules:
        m = _pattern(remote).match(name)
        if m:
            return [_filled(n, m) for n in natives]
    return []


def to_remote(family: str, state: dict, native_config: dict) -> dict:
    """A native state dict in the remote checkpoints' names and layout."""
    spec, out, used = REMOTE[family], {}, set()
    if not spec.modules:
        return dict(state)
    for remote, natives, _ in spec.modules:
        for name in state:
            m = _pattern(natives[0]).match(name)
            if m:
                parts = [_filled(n, m) for n in natives]
                out[_filled(remote, m)] = torch.cat([state[p] for p in parts])
                used.update(parts)
    assert used == set(state), set(state) - used
    return {**out, **spec.buffers(spec.config(native_config))}


def to_native(family: str, state: dict, native_config: dict) -> dict:
    """A remote state dict in the native names and layout (the remote-only buffers dropped)."""
    out = {}
    if not REMOTE[family].modules:
        return dict(state)
    for name, t in state.items():
        for remote, natives, rows in REMOTE[family].modules:
            m = _pattern(remote).match(name)
            if m:
                out.update(zip((_filled(n, m) for n in natives), t.split(rows(native_config)) if rows else [t]))
                break
        else:
            assert name in REMOTE[family].buffers(REMOTE[family].config(native_config)), name
    return out


def native_model(family: str, **extra):
    config_cls, model_cls, kwargs = REMOTE[family].native
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**kwargs, **extra})).eval()


# --- families without a native counterpart: their forward transcribed from the remote code ---------------------------

def causal_attention(q, k, v, heads: int, kv_heads: int):
    """Causal attention of [b, s, heads * hd] queries over kv_heads key / value heads, each shared by
    heads // kv_heads query heads in turn. Positions (ALiBi, rotary) and scales other than 1 / sqrt(hd) are left out:
    no tensor reads them, so roles do not depend on them."""
    b, s, _ = q.shape
    q, k, v = (t.reshape(b, s, n, -1).transpose(1, 2) for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)


def _holding(**children) -> nn.Module:
    """A module that only holds its children, under the names the checkpoints give them."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class JaisBlock(nn.Module):
    """JAISBlock: GPT-2's pre-LN block (Conv1D, [in, out]) with a SwiGLU MLP, c_fc2 the gate."""

    def __init__(self, c: dict):
        super().__init__()
        d, f, self.heads = c["n_embd"], c["n_inner"], c["n_head"]
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _holding(c_attn=Conv1D(3 * d, d), c_proj=Conv1D(d, d))
        self.mlp = _holding(c_fc=Conv1D(f, d), c_fc2=Conv1D(f, d), c_proj=Conv1D(d, f))

    def forward(self, h):
        q, k, v = self.attn.c_attn(self.ln_1(h)).chunk(3, dim=-1)
        h = h + self.attn.c_proj(causal_attention(q, k, v, self.heads, self.heads))
        x = self.ln_2(h)
        return h + self.mlp.c_proj(self.mlp.c_fc(x) * F.silu(self.mlp.c_fc2(x)))


class Jais(nn.Module):
    """JAISLMHeadModel with ALiBi: the embeddings times embeddings_scale, the logits times width_scale (muP)."""

    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        start = 2 ** (-8 / c["n_head"])  # AlibiPositionEmbeddingLayer's slopes, a parameter the checkpoints hold
        slopes = nn.Parameter(torch.tensor([start ** (i + 1) for i in range(c["n_head"])])[:, None], requires_grad=False)
        self.transformer = _holding(wte=nn.Embedding(c["vocab_size"], c["n_embd"]),
                                    h=nn.ModuleList(JaisBlock(c) for _ in range(c["n_layer"])),
                                    ln_f=nn.LayerNorm(c["n_embd"]), relative_pe=_holding())
        self.transformer.relative_pe.slopes = slopes
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids):
        h = self.transformer.wte(ids) * self.c["embeddings_scale"]
        for block in self.transformer.h:
            h = block(h)
        return self.lm_head(self.transformer.ln_f(h)) * self.c["width_scale"]


class Phi3SmallLayer(nn.Module):
    """Phi3SmallDecoderLayer: pre-LN, query_key_value head-major by key / value group (its query heads, its key, its
    value), a GEGELU MLP over up_proj's interleaved rows (gegelu_limit's clamp left out). Block-sparse layers differ
    only in which keys a query sees."""

    def __init__(self, c: dict):
        super().__init__()
        d, f, self.heads, self.groups = c["hidden_size"], c["ff_intermediate_size"], c["num_attention_heads"], \
            c["num_key_value_heads"]
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = _holding(query_key_value=nn.Linear(d, d // self.heads * (self.heads + 2 * self.groups)),
                                  dense=nn.Linear(d, d))
        self.mlp = _holding(up_proj=nn.Linear(d, 2 * f), down_proj=nn.Linear(f, d))

    def forward(self, h):
        b, s, d = h.shape
        qkv = self.self_attn.query_key_value(self.input_layernorm(h)).view(b, s, self.groups, -1, d // self.heads)
        q, k, v = (qkv[..., :-2, :].reshape(b, s, -1), qkv[..., -2, :].reshape(b, s, -1), qkv[..., -1, :].reshape(b, s, -1))
        h = h + self.self_attn.dense(causal_attention(q, k, v, self.heads, self.groups))
        up = self.mlp.up_proj(self.post_attention_layernorm(h))
        gelu, linear = up[..., ::2], up[..., 1::2]
        return h + self.mlp.down_proj(gelu * torch.sigmoid(1.702 * gelu) * (linear + 1))


class Phi3Small(nn.Module):
    """Phi3SmallForCausalLM: the embeddings times mup_embedding_multiplier, the logits over mup_width_multiplier."""

    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        self.model = _holding(embed_tokens=nn.Embedding(c["vocab_size"], c["hidden_size"]),
                              layers=nn.ModuleList(Phi3SmallLayer(c) for _ in range(c["num_hidden_layers"])),
                              final_layernorm=nn.LayerNorm(c["hidden_size"]))
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        h = self.model.embed_tokens(ids) * self.c["mup_embedding_multiplier"]
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.final_layernorm(h)) / self.c["mup_width_multiplier"]


@dataclass(frozen=True)
class Transcribed:
    """A remote-code family without a native counterpart: its transcribed model and a tiny config."""
    model: Callable[[dict], nn.Module]
    config: dict
    mergekit: str = ""


TRANSCRIBED = {
    # jais-13b's settings (SwiGLU, ALiBi, muP scalars), tiny
    "jais": Transcribed(Jais, {"architectures": ["JAISLMHeadModel"], "model_type": "jais", "n_embd": 32, "n_layer": 2,
                               "n_head": 4, "n_inner": 64, "vocab_size": 128, "n_positions": 64,
                               "activation_function": "swiglu", "position_embedding_type": "alibi",
                               "embeddings_scale": 14.6, "width_scale": 0.111, "scale_qk_dot_by_d": True,
                               "layer_norm_epsilon": 1e-5}, "jais"),
    # Phi-3-small-8k's settings (grouped queries, GEGELU, a dense layer every other, muP), tiny
    "phi3small": Transcribed(Phi3Small, {"architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
                                         "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "ff_intermediate_size": 48, "vocab_size": 128,
                                         "hidden_act": "gegelu", "gegelu_limit": 20.0,
                                         "dense_attention_every_n_layers": 2, "mup_use_scaling": True,
                                         "mup_embedding_multiplier": 10.0, "mup_width_multiplier": 8.0,
                                         "mup_attn_multiplier": 1.0, "tie_word_embeddings": True}, "phi3-small"),
}
FAMILIES = sorted([*REMOTE, *TRANSCRIBED])  # "table:model type" where a table holds the family as one of its types
TABLES = {family.split(":")[0] for family in FAMILIES}  # the role tables this module tests


# --- both kinds: built, saved in the remote names, loaded back -------------------------------------------------------

def build(family: str, depth: int = 2):
    """A tiny model of the family (native, or transcribed) at `depth`."""
    if family in REMOTE:
        return native_model(family, num_hidden_layers=depth)
    spec = TRANSCRIBED[family]
    torch.manual_seed(0)
    return spec.model(dict(spec.config, **{for_config(spec.config).num_layers_keys[0]: depth})).eval()


def save(family: str, model, folder: Path) -> Path:
    """`model` saved as the remote checkpoints are: tensors in their names and layout, their config."""
    folder.mkdir(parents=True)
    if family in REMOTE:
        native = json.loads(model.config.to_json_string())
        state, config = to_remote(family, model.state_dict(), native), REMOTE[family].config(native)
    else:
        config = model.c
        tied = for_config(config).tied(config)
        state = {k: v for k, v in model.state_dict().items() if not (tied and for_config(config).role(k).role == "lm_head")}
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def load(family: str, folder: Path):
    """A remote checkpoint loaded, every tensor, into the family's model at the depth its config says."""
    config = json.loads((folder / "config.json").read_text())
    model = build(family, for_config(config).num_layers(config))
    state = load_file(folder / "model.safetensors")
    if family in REMOTE:
        state = to_native(family, state, json.loads(model.config.to_json_string()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = [n for n in missing if for_config(config).role(n).role == "lm_head" and for_config(config).tied(config)]
    assert not unexpected and missing == head, (missing, unexpected)
    return model


def logits(family: str, model, ids):
    """The model's logits, as the remote code computes them."""
    forward = REMOTE[family].forward if family in REMOTE else None
    with torch.no_grad():
        if forward:
            return forward(model, ids, REMOTE[family].config(json.loads(model.config.to_json_string())))
        out = model(ids)
    return out if torch.is_tensor(out) else out.logits


def fine_tunes(family: str, root: Path) -> list[Path]:
    """A base and two fine-tunes of it (the base perturbed), saved as the remote checkpoints are."""
    base = perturbed(build(family))
    paths = [save(family, base, root / "base")]
    constant = lambda name: family in TRANSCRIBED and for_config(base.c).role(name).role == "buffer"  # ALiBi slopes
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        tuned = build(family)
        tuned.load_state_dict({k: v if constant(k) else v + 0.01 * torch.randn(v.shape, generator=g)
                               for k, v in base.state_dict().items()})
        paths.append(save(family, tuned, root / f"tuned{i}"))
    return paths


def task_arithmetic(paths: list[Path], layer_ranges=None) -> dict:
    models = [{"model": str(p), **({"parameters": {"weight": 0.5}} if p != paths[0] else {})} for p in paths]
    return {"merge_method": "task_arithmetic", "base_model": str(paths[0]), "dtype": "float32",
            **({"models": models[1:]} if layer_ranges is None else
               {"slices": [{"sources": [dict(m, layer_range=r) for m in models]} for r in layer_ranges]})}


def merge(recipe: dict, out: Path) -> Path:
    seme.merge(yaml.safe_dump(recipe), str(out), progress=False)
    return out


def mergekit_names(definition: str, layers: int) -> list[str]:
    """The names mergekit's definition lists, of every tensor it requires, for a model of `layers` layers."""
    import mergekit

    data = json.loads((Path(mergekit.__file__).parent / "_data" / "architectures" / f"{definition}.json").read_text())
    names = [w["name"] for w in data["pre_weights"] + data["post_weights"] if not w.get("optional")]
    return names + [w["name"].replace("${layer_index}", str(i)) for i in range(layers)
                    for w in data["layer_templates"]["weights"] if not w.get("optional")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the model, its remote config.json, its remote tensors) per family: a perturbed tiny model, saved."""
    cache = {}

    def get(family):
        if family not in cache:
            model = perturbed(build(family))
            folder = save(family, model, tmp_path_factory.mktemp(family) / "m")
            cache[family] = model, json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")
        return cache[family]

    return get


# --- tests -------------------------------------------------------------------------------------------------------

LAYER = re.compile(r"^(.*?\.(?:layers|h)\.(\d+))\.")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_checkpoint_tensor_has_its_role(saved, family):
    """Every tensor has a role, of its layer, of the right width where it reads or writes the stream; every tensor the
    table requires is there in every layer; the head is tied as the remote code ties it."""
    model, config, state = saved(family)
    arch = for_config(config)
    assert arch.name == family.split(":")[0] and not arch.inferred and arch.num_layers(config) == 2 and arch.hidden_size(config) == 32
    for name, t in state.items():
        r = arch.role(name)
        assert r is not None, name
        m = LAYER.match(name)
        assert r.layer == (int(m[2]) if m else None), name
        in_dim, out_dim = (-1, -2) if r.layout == "out_in" else (-2, -1)
        assert r.role != "read" or t.shape[in_dim] == 32, name
        assert r.role != "write" or t.shape[out_dim] == 32, name
    for template, spec in arch.tensors.items():
        for i in range(2) if "{layer}" in template else [None]:
            name = arch.layer_name(template, i) if i is not None else template
            assert spec.optional or (spec.role == "lm_head" and arch.tied(config)) or name in state, template
    if family in TRANSCRIBED:  # the head shares the embedding's weight
        own = model.state_dict()
        embedding, head = (next(n for n in own if arch.role(n).role == role) for role in ("embedding", "lm_head"))
        assert arch.tied(config) == (own[embedding].data_ptr() == own[head].data_ptr())
    else:
        assert arch.tied(config) == model.config.tie_word_embeddings


@pytest.mark.parametrize("family", sorted(REMOTE))
def test_remote_names_have_their_native_counterparts_roles(saved, family):
    model, config, state = saved(family)
    arch, native = for_config(config), for_config(json.loads(model.config.to_json_string()))
    for name in state:
        r = arch.role(name)
        counterparts = native_names(family, name)
        if not counterparts:  # a buffer the remote code keeps in its checkpoints (rotary frequencies)
            assert r.role == "buffer", name
        for counterpart in counterparts:
            n = native.role(counterpart)
            assert (r.role, r.layer) == (n.role, n.layer), name
            assert (native_names(family, r.norm) if r.norm else [None]) == [n.norm], name


@pytest.mark.parametrize("family", sorted(TRANSCRIBED))
def test_reads_take_their_norms_output_and_layers_add_their_writes(saved, family):
    """In the transcribed forward, each read's input is its norm's output (the head's, the final norm's), and each
    layer's output is its input plus what its writes output: nothing else reaches the stream."""
    model, config, state = saved(family)
    arch = for_config(config)
    modules = dict(model.named_modules())
    inputs, outputs = {}, {}

    def record(name):
        def hook(_, args, output):
            inputs[name], outputs[name] = args[0], output
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    logits(family, model, torch.arange(3, 11)[None])
    for handle in handles:
        handle.remove()
    module = lambda tensor: tensor.rsplit(".", 1)[0]
    for name in state:
        r = arch.role(name)
        if r.role == "read":
            assert inputs[module(name)] is outputs[module(r.norm)], name
    head, final = (next(t for t, s in arch.tensors.items() if s.role == role) for role in ("lm_head", "final_norm"))
    assert inputs[module(head)] is outputs[module(final)]
    for i in range(2):
        layer = next(LAYER.match(n)[1] for n in state if arch.role(n).layer == i)
        writes = [outputs[module(n)] for n in state if arch.role(n).role == "write" and arch.role(n).layer == i]
        torch.testing.assert_close(outputs[layer], inputs[layer] + sum(writes), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if (REMOTE.get(f) or TRANSCRIBED.get(f)).mergekit])
def test_the_names_mergekit_lists_are_claimed(saved, family):
    pytest.importorskip("mergekit")
    _, config, state = saved(family)
    arch = for_config(config)
    for name in mergekit_names((REMOTE.get(family) or TRANSCRIBED.get(family)).mergekit, 2):
        assert name in state and arch.role(name) is not None, name


@pytest.mark.parametrize("family", FAMILIES)
def test_merges_of_remote_checkpoints_reload(family, tmp_path):
    """task_arithmetic of fine-tunes in the remote names is base + the weighted task vectors, buffers copied (a native
    family's equals the same merge of the native checkpoints); a frankenmerge (layers 0, 1, 1) holds the new depth under
    every depth key of its config and reloads at that depth, or is refused where the table fixes the layers."""
    paths = fine_tunes(family, tmp_path / "remote")
    sources = [load_file(p / "model.safetensors") for p in paths]
    whole = load_file(merge(task_arithmetic(paths), tmp_path / "whole") / "model.safetensors")
    arch = for_config(json.loads((paths[0] / "config.json").read_text()))
    assert whole.keys() == sources[0].keys()
    for name, base in sources[0].items():
        expected = base if arch.role(name).role == "buffer" else base + sum(0.5 * (s[name] - base) for s in sources[1:])
        torch.testing.assert_close(whole[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    if family in REMOTE:  # the same merge of the native checkpoints, converted
        natives = [tmp_path / "native" / p.name for p in paths]
        for path in paths:
            load(family, path).save_pretrained(tmp_path / "native" / path.name)
        native = load_file(merge(task_arithmetic(natives), tmp_path / "native_whole") / "model.safetensors")
        got = to_native(family, whole, json.loads(build(family).config.to_json_string()))
        assert got.keys() == native.keys() and all(torch.equal(got[k], t) for k, t in native.items())
    assert torch.isfinite(logits(family, load(family, tmp_path / "whole"), torch.arange(3, 11)[None])).all()

    sliced = task_arithmetic(paths, [[0, 2], [1, 2]])
    if arch.fixed_layers:
        with pytest.raises(SemeError, match=f"slices move, drop or repeat layers of {arch.name}, whose layers must stay"):
            merge(sliced, tmp_path / "sliced")
        return
    config = json.loads((merge(sliced, tmp_path / "sliced") / "config.json").read_text())
    keys = [k for k in arch.num_layers_keys if k in config]
    assert keys and all(config[k] == 3 for k in keys), config
    model = load(family, tmp_path / "sliced")
    state = load_file(tmp_path / "sliced" / "model.safetensors")
    repeated = [n for n in state if arch.role(n).layer == 2]
    assert repeated and all(torch.equal(state[n], state[arch.rename_layer(n, 1)]) for n in repeated)
    assert torch.isfinite(logits(family, model, torch.arange(3, 11)[None])).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rotation_by_the_remote_table_keeps_the_function(family, tmp_path):
    """Turning the remote checkpoint's residual stream by seme's table alone leaves the logits (a wrong or missing role
    moves them by percents), where the table does not say why it cannot be turned."""
    arch = for_config(json.loads(save(family, build(family), tmp_path / "probe").joinpath("config.json").read_text()))
    if arch.rotation_obstacles():
        pytest.skip(f"{family}: {arch.rotation_obstacles()}")
    folder = save(family, perturbed(build(family)), tmp_path / "A")
    state = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    turned = tmp_path / "turned"
    turned.mkdir()
    save_file({k: v.float() for k, v in rotate(state, arch, Q).items()}, turned / "model.safetensors")
    (turned / "config.json").write_text((folder / "config.json").read_text())
    ids = torch.arange(3, 11).unsqueeze(0)
    expected, got = logits(family, load(family, folder), ids), logits(family, load(family, turned), ids)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rotated_remote_checkpoint_is_aligned_back_or_refused(family, tmp_path, capsys):
    """SeMe turns a rotated copy back by the remote table (merging a model with its own rotation gives the model),
    or, where the table says it cannot be turned, refuses in one line."""
    remote = save(family, perturbed(build(family)), tmp_path / "A")
    config = json.loads((remote / "config.json").read_text())
    arch = for_config(config)
    state = load_file(remote / "model.safetensors")
    Q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    (tmp_path / "rotA").mkdir()
    save_file({k: v.float() for k, v in rotate({k: v.double() for k, v in state.items()}, arch, Q).items()},
              tmp_path / "rotA" / "model.safetensors")
    (tmp_path / "rotA" / "config.json").write_text(json.dumps(config))
    if arch.rotation_obstacles():
        recipe = tmp_path / "r.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": str(remote),
                                          "models": [{"model": str(tmp_path / "rotA")}]}))
        assert main([str(recipe), str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"seme: error: SeMe: aligning {arch.label} models by rotation is "
                                                   f"not supported ({arch.rotation_obstacles()[0]}"), err
        return
    report = seme_merge(str(remote), [str(tmp_path / "rotA")], tmp_path / "out")
    assert report["sources"][0]["applied"]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == state.keys()
    for name, t in state.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-5, msg=name)


def test_chatglm_configs_unlike_the_released_ones():
    """ChatGLM's head is never tied, whatever the config says. Configs no released ChatGLM has: torch LayerNorms
    (rmsnorm false), each with a bias, which keep a rotation out; the norms' outputs as the residual
    (apply_residual_connection_post_layernorm)."""
    assert not for_config({"architectures": ["ChatGLMModel"]}).tied({"tie_word_embeddings": True})
    layer_norms = for_config({"architectures": ["ChatGLMModel"], "rmsnorm": False})
    assert layer_norms.norm_type == "layer_norm" and layer_norms.rotation_obstacles()
    for name, role in [("transformer.encoder.layers.3.input_layernorm.bias", "norm_bias"),
                       ("transformer.encoder.layers.3.post_attention_layernorm.bias", "norm_bias"),
                       ("transformer.encoder.final_layernorm.bias", "final_norm_bias")]:
        assert layer_norms.role(name).role == role, name
    post_ln = for_config({"architectures": ["ChatGLMModel"], "apply_residual_connection_post_layernorm": True})
    assert post_ln.normed_residual and post_ln.rotation_obstacles()
    assert not for_config({"architectures": ["ChatGLMModel"], "rmsnorm": True}).rotation_obstacles()


def test_jais_configs_unlike_the_released_ones():
    """Jais' config defaults, which no released model keeps: learned positions (a wpe table, no ALiBi slopes), and
    the GELU MLP of c_fc alone."""
    learned = for_config({"architectures": ["JAISLMHeadModel"], "position_embedding_type": "learned"})
    assert learned.role("transformer.wpe.weight").role == "position_embedding"
    assert learned.role("transformer.relative_pe.slopes") is None
    assert learned.spec("transformer.h.{layer}.mlp.c_fc2.weight", 0).optional
    alibi = for_config({"architectures": ["JAISLMHeadModel"], "position_embedding_type": "alibi"})
    assert alibi.role("transformer.wpe.weight") is None and alibi.role("transformer.relative_pe.slopes").role == "buffer"


def test_solars_skip_connections_change_the_function(saved):
    """The rotation test runs Solar's block skip connections: without them the logits differ."""
    model, _, _ = saved("solar")
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        assert not torch.allclose(logits("solar", model, ids), model(ids).logits)
