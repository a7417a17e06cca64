"""Tiny Hugging Face models built on the spot (no downloads), shared by the tests."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# family -> (config class, model class, config beyond the common one): the variants mergekit reads
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"use_qkv_bias": True}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"use_qk_norm": True}),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", {}),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", {"head_dim": 8}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"head_dim": 8}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"n_inner": 64}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 48, "mamba_n_heads": 8,
        "mamba_d_head": 8, "mamba_n_groups": 1, "mamba_d_state": 16, "layer_types": ["linear_attention", "full_attention"]}),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]}),
    "mamba": ("MambaConfig", "MambaForCausalLM", {"state_size": 8}),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                                  "num_shared_experts": 1, "moe_intermediate_size": 16,
                                                  "num_dense_layers": 1}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        "num_key_value_heads": 4, "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
        "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    # encoders: a pooler and a classifier, masked-LM heads
    "bert": ("BertConfig", "BertForSequenceClassification", {}),
    # tied, as its checkpoints are: mergekit's definition lacks the lm_head.decoder.bias an untied one stores
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", {"tie_word_embeddings": True}),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", {"hidden_dim": 64}),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {
        "head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24}),
}

# Families mergekit has no definition for, built the same way.
OTHER_CLASSES = {
    # per-layer inputs: a second table of a row per token
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", {
        "head_dim": 8, "global_head_dim": 16, "layer_types": ["sliding_attention", "full_attention"],
        "hidden_size_per_layer_input": 8}),
    # mergekit's BertForMaskedLM wants the pooler of older checkpoints, which transformers' has not
    "bert_mlm": ("BertConfig", "BertForMaskedLM", {}),
    # encoders 2 (DeBERTa-v3's relative positions; ELECTRA's embeddings as wide as the stream)
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", {
        "relative_attention": True, "position_buckets": 8, "norm_rel_ebd": "layer_norm", "share_att_key": True,
        "pos_att_type": "p2c|c2p", "position_biased_input": False}),
    "deberta": ("DebertaConfig", "DebertaForSequenceClassification", {"relative_attention": True}),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", {"cls_token_id": 1, "sep_token_id": 2}),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", {"embedding_size": 32}),
    "roberta_prelayernorm": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormForMaskedLM", {}),
    "xlm_roberta_xl": ("XLMRobertaXLConfig", "XLMRobertaXLForSequenceClassification", {}),
    # encoders 3
    "data2vec_text": ("Data2VecTextConfig", "Data2VecTextForMaskedLM", {}),
    "xmod": ("XmodConfig", "XmodForMaskedLM", {"languages": ["en_XX", "de_DE"], "default_language": "en_XX"}),
    "megatron_bert": ("MegatronBertConfig", "MegatronBertForMaskedLM", {}),
    "bert_generation": ("BertGenerationConfig", "BertGenerationDecoder", {"is_decoder": True}),
    "big_bird": ("BigBirdConfig", "BigBirdForMaskedLM", {"attention_type": "original_full"}),
    "rembert": ("RemBertConfig", "RemBertForMaskedLM", {"input_embedding_size": 16, "output_embedding_size": 24}),
    "roformer": ("RoFormerConfig", "RoFormerForMaskedLM", {}),
    # esm, albert
    "esm": ("EsmConfig", "EsmForMaskedLM", {"position_embedding_type": "rotary", "mask_token_id": 3}),
    "albert": ("AlbertConfig", "AlbertForMaskedLM", {"embedding_size": 16}),
    # text-embedding encoders (NomicBERT's and GTE's checkpoints fuse what transformers splits in memory)
    "mpnet": ("MPNetConfig", "MPNetForMaskedLM", {}),
    "nomic_bert": ("NomicBertConfig", "NomicBertForMaskedLM", {}),
    "gte": ("GteConfig", "GteForMaskedLM", {}),
    "eurobert": ("EuroBertConfig", "EuroBertForMaskedLM", {"mask_token_id": 3}),
    # classic encoders
    "longformer": ("LongformerConfig", "LongformerForMaskedLM", {"attention_window": 4}),
    "layoutlm": ("LayoutLMConfig", "LayoutLMForMaskedLM", {}),
    "fnet": ("FNetConfig", "FNetForMaskedLM", {}),
    "convbert": ("ConvBertConfig", "ConvBertForMaskedLM", {"embedding_size": 16}),
    "mobilebert": ("MobileBertConfig", "MobileBertForMaskedLM", {"embedding_size": 16, "intra_bottleneck_size": 16}),
}


def build_model(path, family: str = "llama", *, seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = 96,
                tied: bool = False, base_state: dict | None = None, delta: float = 0.05,
                dtype: torch.dtype = torch.float32) -> dict:
    """Save a tiny random model (or, with base_state, base + a small random task vector) at `path`."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tied,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config_cls, model_cls, extra = {**FAMILY_CLASSES, **OTHER_CLASSES}[family]
    config = getattr(transformers, config_cls)(**{**common, **extra})
    if hasattr(config, "vocab_size_per_layer_input"):  # gemma 4's per-layer token table: a row per token too
        config.vocab_size_per_layer_input = vocab
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    if model_cls.startswith("Esm"):
        model._weight_conversions = []  # saved as the Hub's checkpoints name their tensors (test_esm_spellings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base_state is not None:
                p.copy_(base_state[name] + delta * torch.randn_like(p) * (base_state[name].std().nan_to_num() + 1e-3))
            elif "norm" in name:  # non-trivial gains, so merges of norms are tested too
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    save_tokenizer(path, vocab)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def save_tokenizer(path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def build_family(root, family: str, n_experts: int = 3, **kw) -> dict:
    """base + n experts (base plus independent small task vectors) under root/<family>/."""
    folder = os.path.join(root, family)
    paths = {"base": os.path.join(folder, "base")}
    base = build_model(paths["base"], family, seed=0, **kw)
    for i in range(n_experts):
        paths[f"expert{i}"] = os.path.join(folder, f"expert{i}")
        build_model(paths[f"expert{i}"], family, seed=10 + i, base_state=base, **kw)
    return paths


def _family_fixture(family: str):
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        """base + 3 experts of the family (build_family), built once per session."""
        return build_family(str(tmp_path_factory.mktemp("models")), family)

    return fixture


llama_family, qwen2_family, bert_family, roberta_family, distilbert_family = (
    _family_fixture(f) for f in ("llama", "qwen2", "bert", "roberta", "distilbert"))


def with_bad_element(model: str, folder, tensor: str, value: float) -> str:
    """A copy of the model folder `model` in `folder` whose `tensor` holds `value` (NaN, Inf) at one element."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state[tensor].view(-1)[37] = value
    save_file(state, path, metadata={"format": "pt"})
    return str(folder)


def load_folder(path) -> dict:
    """Every tensor of a safetensors model folder."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
