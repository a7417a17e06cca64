"""Encoder-decoder families (T5 and its kin, Whisper, BART's, ProphetNet, NLLB-MoE, PEGASUS-X, FSMT, T5Gemma 1 and 2;
their classification and question-answering heads), the decoders their *ForCausalLM classes save alone, TrOCR's
decoder, and GIT (a captioner: a vision tower and projector before its causal text stack, as parts): their role tables,
their parts as mergekit's per-module recipes name them (encoder, decoder, shared), and merges of them, against
mergekit's where mergekit can merge them (its 0.1.5 Whisper definition names no tensor right: model.decoderlayers.0...).
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import transformers
import yaml
from safetensors import torch as safetensors_torch

import seme
import tiny_models
from conftest import load_folder
import seme.architectures as archs
from seme.architectures import for_config
from seme.errors import SemeError
from test_parity_mergekit import run_mergekit

T5 = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
WHISPER = dict(vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
               max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
BART = dict(vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
PROPHETNET = dict(vocab_size=96, hidden_size=32, num_encoder_layers=3, num_decoder_layers=2, num_encoder_attention_heads=4,
                  num_decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, ngram=2, num_buckets=8,
                  relative_max_distance=16)
# two vocabularies: the source's (the encoder's table), the target's (the decoder's and its head)
FSMT = dict(langs=["en", "de"], src_vocab_size=96, tgt_vocab_size=80, d_model=32, encoder_layers=3, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
TROCR = dict(vocab_size=96, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cross_attention_hidden_size=24)
# an image of 4 x 4 patches, convolved twice with stride 2 into one image feature
PP_FORMULANET = dict(text_config=dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                                      vocab_size=96, max_position_embeddings=64),
                     vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=32,
                                        post_conv_in_channels=8, post_conv_mid_channels=16, post_conv_out_channels=24,
                                        decoder_hidden_size=32))
PIX2STRUCT = dict(text_config=dict(hidden_size=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=96),
                  vision_config=dict(hidden_size=32, d_ff=48, d_kv=8, num_hidden_layers=2, num_attention_heads=2,
                                     patch_embed_hidden_size=48, seq_len=16))
# GIT: a CLIP tower over 2 x 2 patches of 16 pixels (with its class token, 5 image rows), narrower than the text stack
GIT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=32, patch_size=16))
# T5Gemma's stacks, each of its own settings (sliding and full attention layers alternate); T5Gemma 2's encoder reads
# images too: a SigLIP tower of 4 x 4 patches, pooled into 4 image tokens (id 93) before the end-of-image token (94)
GEMMA_STACK = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
T5GEMMA = dict(encoder=dict(GEMMA_STACK, num_hidden_layers=3), decoder=GEMMA_STACK, vocab_size=96)
T5GEMMA2 = dict(encoder=dict(text_config=dict(GEMMA_STACK, num_hidden_layers=3), mm_tokens_per_image=4,
                             eoi_token_index=94, boi_token_index=95,
                             vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=32, patch_size=8,
                                                vision_use_head=False)),
                decoder=GEMMA_STACK, image_token_index=93)
# Two described models composed: a ViT encoder and TrOCR's decoder, of another width (enc_to_dec_proj maps between
# them); a BERT encoder and a BERT decoder with cross-attention; each encoder with a GPT-2 decoder (vit-gpt2
# captioners, BERT2GPT2), whose cross-attention's Conv1D k / v read the encoder's output at GPT-2's width
VIT = dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=32, patch_size=8)
BERT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
CROSS_ATTENDING = dict(is_decoder=True, add_cross_attention=True)
GPT2 = dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
            eos_token_id=2, add_cross_attention=True)
COMPOSED = dict(decoder_start_token_id=2, pad_token_id=1)
COMPOSITIONS = ("vision-encoder-decoder", "encoder-decoder", "vision-encoder-decoder:gpt2", "encoder-decoder:gpt2")  # keys of FAMILIES whose tables compose two tables
FAMILIES = {  # "table:what" keys, as in test_architectures
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(T5, feed_forward_proj="relu")),
    "t5:gated": ("T5Config", "T5ForConditionalGeneration", dict(T5, feed_forward_proj="gated-gelu")),
    "t5:encoder": ("T5Config", "T5EncoderModel", T5),
    "t5:mt5": ("MT5Config", "MT5ForConditionalGeneration", T5),
    "t5:umt5": ("UMT5Config", "UMT5ForConditionalGeneration", T5),  # a relative_attention_bias per block
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration", WHISPER),
    "whisper:model": ("WhisperConfig", "WhisperModel", WHISPER),  # saved without the 'model.' prefix
    "bart": ("BartConfig", "BartForConditionalGeneration", BART),  # post-LN
    "bart:marian": ("MarianConfig", "MarianMTModel", BART),  # sinusoidal positions, not saved
    "bart:marian-unshared": ("MarianConfig", "MarianMTModel", dict(BART, share_encoder_decoder_embeddings=False)),
    "bart:plbart": ("PLBartConfig", "PLBartForConditionalGeneration", BART),
    "bart:blenderbot-small": ("BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration", BART),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", BART),  # pre-LN
    "mbart:pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", BART),
    "mbart:m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", BART),  # NLLB's dense models
    "mbart:blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration", BART),
    "mvp": ("MvpConfig", "MvpForConditionalGeneration", BART),
    "mvp:prompt": ("MvpConfig", "MvpForConditionalGeneration", dict(BART, use_prompt=True, prompt_length=5, prompt_mid_dim=16)),
    "bigbird_pegasus": ("BigBirdPegasusConfig", "BigBirdPegasusForConditionalGeneration",
                        dict(BART, block_size=4, num_random_blocks=2, use_bias=True)),
    "bigbird_pegasus:model": ("BigBirdPegasusConfig", "BigBirdPegasusModel", dict(BART, block_size=4, num_random_blocks=2)),
    "led": ("LEDConfig", "LEDForConditionalGeneration", dict(BART, attention_window=4, max_encoder_position_embeddings=64,
                                                             max_decoder_position_embeddings=64)),
    "led:model": ("LEDConfig", "LEDModel", dict(BART, attention_window=4, max_encoder_position_embeddings=64,
                                                max_decoder_position_embeddings=64)),  # saved without 'led.'
    "trocr": ("TrOCRConfig", "TrOCRForCausalLM", TROCR),
    "trocr:sinusoidal": ("TrOCRConfig", "TrOCRForCausalLM", dict(TROCR, use_learned_position_embeddings=False,
                                                                 layernorm_embedding=False, tie_word_embeddings=False)),
    "longt5": ("LongT5Config", "LongT5ForConditionalGeneration", dict(T5, encoder_attention_type="local", local_radius=2)),
    "longt5:transient-global": ("LongT5Config", "LongT5ForConditionalGeneration",
                                dict(T5, encoder_attention_type="transient-global", local_radius=2, global_block_size=2)),
    "longt5:encoder": ("LongT5Config", "LongT5EncoderModel", dict(T5, encoder_attention_type="transient-global")),
    # sparse_step 2 of 4 layers: layers 1 and 3 have experts, 0 and 2 a dense feed-forward
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                            dict(T5, num_layers=4, num_decoder_layers=2, num_experts=4, num_sparse_encoder_layers=2,
                                 num_sparse_decoder_layers=1, expert_capacity=8)),
    # experts in every second layer ((i + 1) % step == 0): encoder layers 1 and 3, decoder layer 1
    "nllb_moe": ("NllbMoeConfig", "NllbMoeForConditionalGeneration",
                 dict(BART, encoder_layers=4, num_experts=4, expert_capacity=8, encoder_sparse_step=2,
                      decoder_sparse_step=2)),
    "nllb_moe:router-bias": ("NllbMoeConfig", "NllbMoeForConditionalGeneration",
                             dict(BART, num_experts=4, expert_capacity=8, encoder_sparse_step=1, decoder_sparse_step=0,
                                  router_bias=True)),
    # blocks of 4 tokens beside 2 global tokens
    "pegasus_x": ("PegasusXConfig", "PegasusXForConditionalGeneration", dict(BART, num_global_tokens=2, block_size=4)),
    "prophetnet": ("ProphetNetConfig", "ProphetNetForConditionalGeneration", PROPHETNET),
    "fsmt": ("FSMTConfig", "FSMTForConditionalGeneration", FSMT),  # post-LN
    "fsmt:tied": ("FSMTConfig", "FSMTForConditionalGeneration", dict(FSMT, src_vocab_size=80, tie_word_embeddings=True)),
    "prophetnet:model": ("ProphetNetConfig", "ProphetNetModel", PROPHETNET),  # saved without 'prophetnet.'
    # heads over the decoder's output (post-LN: raw; pre-LN: its final norm's)
    "bart:classification": ("BartConfig", "BartForSequenceClassification", BART),
    "bart:qa": ("BartConfig", "BartForQuestionAnswering", BART),
    "bart:plbart-classification": ("PLBartConfig", "PLBartForSequenceClassification", BART),
    "mbart:classification": ("MBartConfig", "MBartForSequenceClassification", BART),
    "mbart:qa": ("MBartConfig", "MBartForQuestionAnswering", BART),
    "mvp:classification": ("MvpConfig", "MvpForSequenceClassification", BART),
    "mvp:qa": ("MvpConfig", "MvpForQuestionAnswering", BART),
    "led:qa": ("LEDConfig", "LEDForQuestionAnswering", dict(BART, attention_window=4, max_encoder_position_embeddings=64,
                                                            max_decoder_position_embeddings=64)),
    "bigbird_pegasus:classification": ("BigBirdPegasusConfig", "BigBirdPegasusForSequenceClassification",
                                       dict(BART, block_size=4, num_random_blocks=2)),
    "bigbird_pegasus:qa": ("BigBirdPegasusConfig", "BigBirdPegasusForQuestionAnswering",
                           dict(BART, block_size=4, num_random_blocks=2)),
    # decoders saved alone (*ForCausalLM), their cross-attention over encoder_hidden_states from outside
    "bart_decoder": ("BartConfig", "BartForCausalLM", BART),
    "bart_decoder:marian": ("MarianConfig", "MarianForCausalLM", BART),
    "bart_decoder:plbart": ("PLBartConfig", "PLBartForCausalLM", BART),
    "bart_decoder:blenderbot-small": ("BlenderbotSmallConfig", "BlenderbotSmallForCausalLM", BART),
    "bart_decoder:mvp-prompt": ("MvpConfig", "MvpForCausalLM", dict(BART, use_prompt=True, prompt_length=5, prompt_mid_dim=16)),
    "mbart_decoder": ("MBartConfig", "MBartForCausalLM", BART),
    "mbart_decoder:pegasus": ("PegasusConfig", "PegasusForCausalLM", BART),
    "mbart_decoder:blenderbot": ("BlenderbotConfig", "BlenderbotForCausalLM", BART),
    "mbart_decoder:bigbird_pegasus": ("BigBirdPegasusConfig", "BigBirdPegasusForCausalLM", dict(BART, use_bias=True)),
    "prophetnet_decoder": ("ProphetNetConfig", "ProphetNetForCausalLM", PROPHETNET),
    "pp_formulanet": ("PPFormulaNetConfig", "PPFormulaNetForConditionalGeneration", PP_FORMULANET),  # image to text
    "pix2struct": ("Pix2StructConfig", "Pix2StructForConditionalGeneration", PIX2STRUCT),
    "pix2struct:tied": ("Pix2StructConfig", "Pix2StructForConditionalGeneration", dict(PIX2STRUCT, tie_word_embeddings=True)),
    "git": ("GitConfig", "GitForCausalLM", GIT),  # an image's features before the text, in one causal stack
    "git:tied": ("GitConfig", "GitForCausalLM", dict(GIT, tie_word_embeddings=True)),
    "git:video": ("GitConfig", "GitForCausalLM", dict(GIT, num_image_with_embedding=2)),  # a vector per frame
    "git:model": ("GitConfig", "GitModel", GIT),  # no head, saved without 'git.'
    "t5gemma": ("T5GemmaConfig", "T5GemmaForConditionalGeneration", T5GEMMA),
    "t5gemma:untied": ("T5GemmaConfig", "T5GemmaForConditionalGeneration", dict(T5GEMMA, tie_word_embeddings=False)),
    # an encoder wider than its decoder, as t5gemma-9b-2b's: the cross-attention's k / v read the encoder's width
    "t5gemma:unbalanced": ("T5GemmaConfig", "T5GemmaForConditionalGeneration",
                           dict(T5GEMMA, encoder=dict(T5GEMMA["encoder"], hidden_size=48))),
    "t5gemma:classification": ("T5GemmaConfig", "T5GemmaForSequenceClassification", T5GEMMA),
    "t5gemma:encoder": ("T5GemmaConfig", "T5GemmaEncoderModel", dict(T5GEMMA, is_encoder_decoder=False)),
    # the encoder alone under a per-token head, which reads the encoder's final norm
    "t5gemma:encoder-token-classification": ("T5GemmaConfig", "T5GemmaForTokenClassification",
                                             dict(T5GEMMA, is_encoder_decoder=False)),
    "t5gemma2": ("T5Gemma2Config", "T5Gemma2ForConditionalGeneration", T5GEMMA2),
    "t5gemma2:untied": ("T5Gemma2Config", "T5Gemma2ForConditionalGeneration", dict(T5GEMMA2, tie_word_embeddings=False)),
    "t5gemma2:classification": ("T5Gemma2Config", "T5Gemma2ForSequenceClassification", T5GEMMA2),
    "vision-encoder-decoder": ("VisionEncoderDecoderConfig", "VisionEncoderDecoderModel", dict(
        COMPOSED, encoder=VIT, decoder=dict(TROCR, model_type="trocr", d_model=24, cross_attention_hidden_size=None, **CROSS_ATTENDING))),
    "encoder-decoder": ("EncoderDecoderConfig", "EncoderDecoderModel", dict(
        COMPOSED, encoder=dict(BERT, model_type="bert"), decoder=dict(BERT, model_type="bert", num_hidden_layers=2,
                                                                      **CROSS_ATTENDING))),
    "vision-encoder-decoder:gpt2": ("VisionEncoderDecoderConfig", "VisionEncoderDecoderModel", dict(
        COMPOSED, encoder=VIT, decoder=dict(GPT2, n_embd=24))),
    "encoder-decoder:gpt2": ("EncoderDecoderConfig", "EncoderDecoderModel", dict(
        COMPOSED, encoder=dict(BERT, model_type="bert"), decoder=GPT2)),
}
HEADS = ("classification", "qa")
LAYER = re.compile(r"\.(?:block|layers?|h)\.(\d+)\.")  # (Pix2Struct's and ViT's: layer; GPT-2's: h)
VECTORS = {"norm", "norm_bias", "final_norm", "final_norm_bias", "write_bias"}


def build(key: str, seed: int = 0, **extra):
    return tiny_models.build(FAMILIES, key, seed, **extra)


def reloaded(key: str, folder):
    """The merged model in `folder` loaded as its family's class, every tensor where the model keeps it (no key
    missing or unexpected)."""
    model, info = getattr(transformers, FAMILIES[key][1]).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (folder, info)
    return model.eval()


def run(model, key: str):
    ids = torch.arange(1, 6).unsqueeze(0)
    if key.split(":")[0].endswith("_decoder"):  # an encoder's output, of the decoder's width
        width = model.config.hidden_size
        return model(input_ids=ids, encoder_hidden_states=torch.randn(1, 4, width))
    if key.endswith(HEADS) and not key.startswith("led"):  # the classifier picks the decoder's rows at the eos tokens
        return model(input_ids=ids)
    if key.startswith("led"):  # the first token attends globally: query_global, key_global and value_global run
        return model(input_ids=ids, decoder_input_ids=ids[:, :3], global_attention_mask=(ids == 1).long())
    if key.startswith("vision-encoder-decoder"):
        return model(pixel_values=torch.randn(1, 3, 32, 32), decoder_input_ids=ids[:, :3])
    if key.startswith("trocr"):  # an image encoder's output, cross_attention_hidden_size wide
        return model(input_ids=ids, encoder_hidden_states=torch.randn(1, 4, TROCR["cross_attention_hidden_size"]))
    if key.startswith(("bart", "mbart", "mvp", "bigbird_pegasus", "prophetnet")):
        return model(input_ids=ids, decoder_input_ids=ids[:, :3])
    if key.startswith("pp_formulanet"):
        return model(pixel_values=torch.randn(1, 3, 64, 64), decoder_input_ids=ids)
    if key.startswith("pix2struct"):  # six patches of 4 x 4 pixels in 2 rows of 3, each (row, column, pixels)
        rows, columns = torch.arange(1, 3).repeat_interleave(3), torch.arange(1, 4).repeat(2)
        patches = torch.cat([rows[:, None], columns[:, None], torch.randn(6, 48)], 1)[None]
        return model(flattened_patches=patches, attention_mask=torch.ones(1, 6), decoder_input_ids=ids)
    if key.startswith("git"):  # an image (or a video of 2 frames) before the text
        frames = (2,) if key == "git:video" else ()
        return model(input_ids=ids, pixel_values=torch.randn(1, *frames, 3, 32, 32))
    if key.startswith("t5gemma2"):  # text and an image, whose 4 pooled features take the image tokens' places
        ids = torch.tensor([[2, 5, 93, 93, 93, 93, 94, 7]])
        decoder_ids = {} if key.endswith(HEADS) else {"decoder_input_ids": ids[:, :3]}
        return model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), **decoder_ids)
    if key.startswith("whisper"):
        return model(input_features=torch.randn(1, WHISPER["num_mel_bins"], 2 * WHISPER["max_source_positions"]),
                     decoder_input_ids=ids)
    return model(input_ids=ids) if key.endswith(":encoder") else model(input_ids=ids, decoder_input_ids=ids[:, :3])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """key -> (model, config.json, {saved tensor name: shape})."""
    get = tiny_models.saved_once(tmp_path_factory, build)

    def shapes(key):
        model, config, state = get(key)
        return model, config, {k: tuple(v.shape) for k, v in state.items()}

    return shapes


def depth(config: dict, key: str) -> int:
    """The depth a part's key gives, dotted where a sub-config holds it (PP-FormulaNet's text_config.decoder_layers)."""
    settings, name = archs.config_entry(config, key)
    return settings[name]


@pytest.mark.parametrize("key", FAMILIES)
def test_checkpoint_roles_and_parts(saved, key):
    model, config, shapes = saved(key)
    arch = for_config(config)
    assert arch.name == key.split(":")[0] and not arch.inferred
    hidden = arch.hidden_size(config)
    # the rows of a part's vocabulary (FSMT's encoder and decoder have their own; PP-FormulaNet's in its text_config)
    vocab_of = lambda name: config[("src" if arch.part_of(name) == "encoder" else "tgt") + "_vocab_size"] \
        if "src_vocab_size" in config else config.get("vocab_size") or \
        config["text_config" if "text_config" in config else arch.part_of(name)]["vocab_size"]
    parts = {p.name: p for p in arch.parts}
    # the width of a part's stream: its final norm's (T5Gemma's encoder may be wider than its decoder), else hidden
    widths = {arch.part_of(n): shape[0] for n, shape in shapes.items()
              if getattr(arch.role(n), "role", None) == "final_norm"}
    width = lambda name: widths.get(arch.part_of(name), hidden)
    for name, shape in shapes.items():
        r = arch.role(name)
        assert r is not None, name
        m = LAYER.search(name)
        assert r.layer == (int(m.group(1)) if m else None), name
        assert arch.part_of(name) in parts, name
        if r.role == "read":  # as wide as the stream its norm normalises (cross-attention's k and v: the encoder's)
            assert shape[0 if r.layout == "in_out" else -1] == width(r.norm or name) and (r.norm is not None or arch.normed_residual), name
            if r.norm is not None:  # its stream's norm, or the encoder's final norm (cross-attention's k and v)
                assert arch.role(r.norm).role in ("norm", "final_norm"), name
                assert r.norm in shapes or r.norm.removeprefix(arch.base_prefix) in shapes, name
        elif r.role == "write":  # [out, in], or [in, out] (T5Gemma 2's projector, applied as x @ W)
            assert shape[-1 if r.layout == "in_out" else 0] == width(name), name
        elif r.role in ("embedding", "lm_head"):
            assert shape == (vocab_of(name), width(name)), name
        elif r.role == "lm_head_bias":
            assert shape in ((vocab_of(name),), (1, vocab_of(name))), name
        elif r.role == "position_embedding":
            assert shape[-1] == width(name), name  # [P, d], or ViT's [1, P, d]
        elif r.role in VECTORS:
            assert shape == (width(name),), name
    # Every required template at every layer of its part's stack, in the parts the checkpoint has.
    present = {arch.part_of(n) for n in shapes}
    for template, spec in arch.tensors.items():
        part = parts[arch.part_of(template)]
        if spec.optional or part.name not in present or (spec.role == "lm_head" and arch.tied(config)):
            continue
        for i in range(depth(config, part.depth_key)) if "{layer}" in template else [None]:
            name = arch.layer_name(template, i) if i is not None else template
            assert name in shapes or name.removeprefix(arch.base_prefix) in shapes, name
    assert arch.rotation_obstacles()  # two streams


# (the composed models' tables are their parts' own, followed alone: ViT's, renamed in memory, in
# tests/test_vision_encoders.py, BERT's in tests/test_architectures.py)
@pytest.mark.parametrize("key", [k for k in FAMILIES if k not in COMPOSITIONS])
def test_norm_feeds_read(saved, key):
    """Run the model: each read projection's input is its norm's output (the cross-attention's keys and
    values: the encoder's final norm's); in a post-LN family, a read without a norm reads the stream: its
    layer's input, or the encoder's output; a head, the decoder's output. Or rows of it: an expert's tokens,
    ProphetNet's main or predicting streams, Longformer's global tokens (in sequence-first order), a classifier's
    eos tokens."""
    model, config, shapes = saved(key)
    arch = for_config(config)
    modules = dict(model.named_modules())
    inputs, outputs = {}, {}

    def hook(name):
        def record(_, args, output):  # (T5's stacks take keywords only)
            if name not in inputs:  # its first call (LongT5's transient-global k and v read the global block sums after)
                inputs[name], outputs[name] = args[0] if args else None, output
        return record

    def in_memory(saved):  # as saved (WhisperModel's too: its names lack 'model.' both ways), but T5Gemma 2's
        # encoder stack, which transformers keeps under text_model in memory
        return saved if saved in modules else saved.replace("encoder.", "encoder.text_model.", 1)

    def module(tensor_name):
        return in_memory(tensor_name.rsplit(".", 1)[0])

    def layer(r):  # the module of a read's layer (a head's: the decoder's, whose output it reads)
        return in_memory(r.template[:r.template.index("{layer}")] + str(r.layer)) if r.layer is not None else "decoder"

    reads = [n for n in shapes if arch.role(n).role == "read"]
    norms = {n: arch.role(n).norm.removeprefix("" if arch.role(n).norm in shapes else arch.base_prefix)
             for n in reads if arch.role(n).norm}
    watched = {module(n) for n in reads} | set(map(module, norms.values())) | {layer(arch.role(n)) for n in reads}
    handles = [modules[m].register_forward_hook(hook(m)) for m in watched - {"decoder"}]
    if model.config.is_encoder_decoder:
        handles.append(model.get_encoder().register_forward_hook(hook("encoder")))
        handles.append(model.get_decoder().register_forward_hook(hook("decoder")))
    with torch.no_grad():
        run(model, key)
    for h in handles:
        h.remove()
    assert reads

    def rows_of(x, y):  # each row of x is a row of y, or padding (zeros: PEGASUS-X's staggered blocks)
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        found = torch.cdist(x, y).min(dim=1).values < 1e-5
        return x.shape[-1] == y.shape[-1] and bool(found.logical_or(x.norm(dim=-1) == 0).all())

    for name in reads:
        if module(name) not in inputs and ".experts." in name:
            continue  # an expert that no token was routed to
        x = inputs[module(name)]
        if name in norms:
            y = outputs[module(norms[name])]
            assert x.shape == y.shape and torch.allclose(x, y) or rows_of(x, y), name
        elif arch.role(name).layer is None:  # a head: the decoder's output
            y = outputs["decoder"][0]
            assert x.shape == y.shape and torch.allclose(x, y) or rows_of(x, y), name
        else:
            stream = inputs[layer(arch.role(name))], *([outputs["encoder"][0]] if "encoder" in outputs else [])
            assert any(x.shape == y.shape and torch.allclose(x, y) or rows_of(x, y) for y in stream), name


def family(tmp_path, key: str, n: int = 3, **extra) -> list[str]:
    return [tiny_models.save(build(key, seed=i, **extra), tmp_path / f"{key.replace(':', '-')}{i}") for i in range(n)]


def merge(recipe: dict, out) -> dict:
    seme.merge(yaml.safe_dump(recipe), str(out), progress=False)
    return load_folder(out)


def modules_recipe(paths, decoder_slices: bool = False) -> dict:
    """mergekit's modular form: the encoder's layers sliced (one dropped, one repeated), the decoder merged
    whole with a gradient (or sliced), the shared token table merged whole."""
    whole = {"models": [{"model": paths[0], "parameters": {"weight": [0.2, 0.9]}},
                        {"model": paths[1], "parameters": {"weight": 0.5}}]}
    encoder = {"slices": [{"sources": [{"model": paths[0], "layer_range": [0, 2], "parameters": {"weight": 1.0}}]},
                          {"sources": [{"model": paths[1], "layer_range": [1, 3], "parameters": {"weight": 1.0}}]}]}
    decoder = {"slices": [{"sources": [{"model": paths[2], "layer_range": [0, 2], "parameters": {"weight": 1.0}}]},
                          {"sources": [{"model": paths[0], "layer_range": [1, 2], "parameters": {"weight": 1.0}}]}]}
    return {"merge_method": "linear", "dtype": "float32",
            "modules": {"encoder": encoder, "decoder": decoder if decoder_slices else whole, "shared": whole}}


def test_t5_modules_match_mergekit(tmp_path):
    paths = family(tmp_path, "t5:gated")
    recipe = modules_recipe(paths)
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    ours, theirs = merge(recipe, tmp_path / "seme"), load_folder(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    config = json.load(open(tmp_path / "seme" / "config.json"))
    assert (config["num_layers"], config["num_decoder_layers"]) == (4, 2)
    source = load_folder(paths[1])
    assert torch.equal(ours["encoder.block.3.layer.1.DenseReluDense.wo.weight"],
                       source["encoder.block.2.layer.1.DenseReluDense.wo.weight"])
    run(transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "seme"), "t5")


@pytest.mark.parametrize("key", ["t5:gated", "t5:umt5"])
def test_t5_whole_merge_matches_mergekit(key, tmp_path):
    # a gradient runs over each stack's own layers, as in mergekit
    paths = family(tmp_path, key)
    recipe = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": paths[0],
              "models": [{"model": paths[1], "parameters": {"weight": [0.1, 0.9]}},
                         {"model": paths[2], "parameters": {"weight": [{"filter": "EncDecAttention", "value": 0.3},
                                                                       {"value": 0.6}]}}]}
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    ours, theirs = merge(recipe, tmp_path / "seme"), load_folder(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def with_own_head(path: str, seed: int) -> None:
    """T5's checkpoint with a head of its own, as T5 v1.1, Flan-T5 and mT5 store theirs on the Hub
    (transformers 5 ties T5's head whatever the config says, and saves none); BART's with a head bias
    that is not zero (Marian's are not)."""
    weights = f"{path}/model.safetensors"
    state = safetensors_torch.load_file(weights)
    g = torch.Generator().manual_seed(seed)
    if "shared.weight" in state:
        state["lm_head.weight"] = torch.randn(state["shared.weight"].shape, generator=g)
        config = json.load(open(f"{path}/config.json"))
        json.dump({**config, "tie_word_embeddings": False}, open(f"{path}/config.json", "w"))
    else:
        state["final_logits_bias"] = torch.randn(state["final_logits_bias"].shape, generator=g)
    safetensors_torch.save_file(state, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("source", ["base", "union"])
@pytest.mark.parametrize("key", ["t5:mt5", "bart"])
def test_renumbered_tokens_merge_as_if_they_were_not(tmp_path, key, source):
    # the shared token table and the head (T5's untied one, BART's [1, V] bias) follow the tokens into
    # the output vocabulary
    from conftest import save_tokenizer
    from test_vocabulary import merged_alike, renumbered

    paths = family(tmp_path, key)
    for i, p in enumerate(paths):
        save_tokenizer(p, T5["vocab_size"])
        with_own_head(p, seed=i)
    other = renumbered(paths[2], tmp_path / "renumbered")
    recipe = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": paths[0],
              "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths[1:]]}
    remapped = {**recipe, "tokenizer_source": source,
                "models": [recipe["models"][0], {"model": other, "parameters": {"weight": 0.5}}]}
    plain = merged_alike(recipe, remapped, tmp_path)
    assert "lm_head.weight" in plain or "final_logits_bias" in plain


def test_whisper_modules(tmp_path):
    """The encoder sliced (its convolutions and positions from the first slice's model, its final norm
    from the last's), the decoder sliced: each part's depth key follows, and the output runs."""
    paths = family(tmp_path, "whisper")
    recipe = modules_recipe(paths, decoder_slices=True)
    del recipe["modules"]["shared"]
    ours = merge(recipe, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    expected = {"model.encoder.conv1.weight": src[0]["model.encoder.conv1.weight"],
                "model.encoder.conv2.bias": src[0]["model.encoder.conv2.bias"],
                "model.encoder.embed_positions.weight": src[0]["model.encoder.embed_positions.weight"],
                "model.encoder.layers.1.fc1.weight": src[0]["model.encoder.layers.1.fc1.weight"],
                "model.encoder.layers.2.fc1.weight": src[1]["model.encoder.layers.1.fc1.weight"],
                "model.encoder.layers.3.fc2.bias": src[1]["model.encoder.layers.2.fc2.bias"],
                "model.encoder.layer_norm.weight": src[1]["model.encoder.layer_norm.weight"],
                "model.decoder.embed_tokens.weight": src[2]["model.decoder.embed_tokens.weight"],
                "model.decoder.layers.2.encoder_attn.k_proj.weight": src[0]["model.decoder.layers.1.encoder_attn.k_proj.weight"],
                "model.decoder.layer_norm.bias": src[0]["model.decoder.layer_norm.bias"]}
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    per_layer = lambda stack: sum(n.startswith(f"model.{stack}.layers.0.") for n in src[0])
    assert len(ours) == len(src[0]) + per_layer("encoder") + per_layer("decoder")  # one more layer each
    config = json.load(open(tmp_path / "seme" / "config.json"))
    assert (config["encoder_layers"], config["decoder_layers"]) == (4, 3)
    run(transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "seme"), "whisper")


@pytest.mark.parametrize("key", ["bart", "bart:marian", "mbart", "mbart:m2m_100"])
def test_bart_family_modules(key, tmp_path):
    """Both stacks sliced (mergekit has no definition of these models): each takes its layers, leading
    tensors (embeddings, positions, layernorm_embedding) from its first slice's model and final norm from
    its last's; the output loads and runs."""
    paths = family(tmp_path, key)
    ours = merge(modules_recipe(paths, decoder_slices=True), tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    expected = {"model.encoder.layers.1.fc1.weight": src[0]["model.encoder.layers.1.fc1.weight"],
                "model.encoder.layers.3.self_attn.q_proj.bias": src[1]["model.encoder.layers.2.self_attn.q_proj.bias"],
                "model.decoder.layers.2.encoder_attn.k_proj.weight": src[0]["model.decoder.layers.1.encoder_attn.k_proj.weight"],
                "model.decoder.layers.0.fc2.bias": src[2]["model.decoder.layers.0.fc2.bias"]}
    for side, first, last in (("encoder", 0, 1), ("decoder", 2, 0)):
        for name in (f"model.{side}.embed_positions.weight", f"model.{side}.layernorm_embedding.bias"):
            if name in src[0]:
                expected[name] = src[first][name]
        if f"model.{side}.layer_norm.weight" in src[0]:
            expected[f"model.{side}.layer_norm.weight"] = src[last][f"model.{side}.layer_norm.weight"]
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    config = json.load(open(tmp_path / "seme" / "config.json"))
    assert (config["encoder_layers"], config["decoder_layers"]) == (4, 3)
    run(transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "seme"), key)


@pytest.mark.parametrize("key, prefix, depth_keys", [("mvp", "model.", ("encoder_layers", "decoder_layers")),
                                                     ("bigbird_pegasus", "model.", ("encoder_layers", "decoder_layers")),
                                                     ("led", "led.", ("encoder_layers", "decoder_layers")),
                                                     ("prophetnet", "prophetnet.", ("num_encoder_layers", "num_decoder_layers")),
                                                     ("pegasus_x", "model.", ("encoder_layers", "decoder_layers")),
                                                     ("fsmt", "model.", ("encoder_layers", "decoder_layers")),
                                                     ("longt5:transient-global", "", ("num_layers", "num_decoder_layers"))])
def test_sliced_stacks_load_and_run(key, prefix, depth_keys, tmp_path):
    """Both stacks sliced: the output's depths follow, a layer comes from its slice's model, each stack's final
    norm from its last slice's (BigBird-Pegasus's layernorm_embedding is one), PEGASUS-X's global tokens from the
    encoder's first, and the output loads and runs."""
    paths = family(tmp_path, key)
    recipe = modules_recipe(paths, decoder_slices=True)
    if key == "fsmt":  # no table is shared: each stack holds its own
        del recipe["modules"]["shared"]
    ours = merge(recipe, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    config = json.load(open(tmp_path / "seme" / "config.json"))
    assert (config[depth_keys[0]], config[depth_keys[1]]) == (4, 3)
    stack = "block" if key.startswith("longt5") else "layers"
    moved = next(n for n in src[1] if n.startswith(f"{prefix}encoder.{stack}.2."))
    assert torch.equal(ours[moved.replace(f".{stack}.2.", f".{stack}.3.")], src[1][moved])
    for name in (f"{prefix}encoder.layernorm_embedding.weight", f"{prefix}decoder.layernorm_embedding.weight"):
        if key == "bigbird_pegasus":  # the encoder's last slice is model 1's, the decoder's model 0's
            assert torch.equal(ours[name], src[0 if ".decoder." in name else 1][name]), name
    if key == "pegasus_x":  # the global tokens' rows lead the encoder, as its embeddings: from its first slice's model
        assert torch.equal(ours["model.encoder.embed_global.weight"], src[0]["model.encoder.embed_global.weight"])
    model = getattr(transformers, FAMILIES[key][1]).from_pretrained(tmp_path / "seme")
    run(model, key)


@pytest.mark.parametrize("key, depth_key", [("pp_formulanet", "decoder_layers"), ("pix2struct", "num_layers")])
def test_an_image_encoder_decoder_merges_whole_and_by_its_parts(key, depth_key, tmp_path):
    """Fine-tunes of one PP-FormulaNet (or Pix2Struct) merged by task_arithmetic, whole and with its decoder sliced
    (layers 0, 1, 1: text_config's depth follows, the image encoder's stays); each output reloads in transformers and
    reads an image."""
    paths = family(tmp_path, key)
    base, tuned = paths[0], [{"model": p} for p in paths[1:]]
    recipes = {
        "whole": {"merge_method": "task_arithmetic", "base_model": base, "models": tuned, "parameters": {"weight": 0.5}},
        "sliced": {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"weight": 0.5}, "modules": {
            "vision_tower": {"models": tuned},
            "text_decoder": {"slices": [{"sources": [{"model": p, "layer_range": [0, 2]} for p in paths]},
                                        {"sources": [{"model": p, "layer_range": [1, 2]} for p in paths]}]}}},
    }
    for name, recipe in recipes.items():
        merge({**recipe, "dtype": "float32"}, tmp_path / name)
        config = json.load(open(tmp_path / name / "config.json"))
        assert (config["text_config"][depth_key], config["vision_config"]["num_hidden_layers"]) == \
            ((3 if name == "sliced" else 2), 2)
        assert torch.isfinite(run(reloaded(key, tmp_path / name), key).logits).all(), name


def merged_whole(key, tmp_path):
    """task_arithmetic of a family's fine-tunes at weight 0.5, every tensor checked (the base's plus half of each
    fine-tune's difference from it), reloaded with no tensor missing or unexpected."""
    paths = family(tmp_path, key)
    ours = merge({"merge_method": "task_arithmetic", "dtype": "float32", "base_model": paths[0],
                  "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths[1:]]}, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    assert sorted(ours) == sorted(src[0])
    for name, base in src[0].items():
        expected = base + 0.5 * (src[1][name] - base) + 0.5 * (src[2][name] - base)
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    return reloaded(key, tmp_path / "seme")


@pytest.mark.parametrize("key", ["pegasus_x", "fsmt", "fsmt:tied", "pix2struct", "pix2struct:tied"])
def test_a_whole_task_arithmetic_merge_reloads(key, tmp_path):
    """FSMT's two tables, of their own sizes, and PEGASUS-X's global tokens merge like any tensor; the output runs
    (Pix2Struct's on an image's patches)."""
    run(merged_whole(key, tmp_path), key)


@pytest.mark.parametrize("key, encoder_settings", [("t5gemma", "encoder"), ("t5gemma2", "encoder.text_config")])
def test_t5gemma_stacks_sliced(key, encoder_settings, tmp_path):
    """Both stacks sliced as modules: their depths, in the nested encoder / decoder settings, and their layer_types
    follow the layers; T5Gemma 2's vision tower, projector and shared token table are merged whole. The output
    loads with no tensor missing or unexpected, and runs."""
    paths = family(tmp_path, key)
    recipe = modules_recipe(paths, decoder_slices=True)
    whole = recipe["modules"].pop("shared")
    if key == "t5gemma2":
        recipe["modules"].update(shared=whole, vision_tower=whole, multi_modal_projector=whole)
    ours = merge(recipe, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    config = json.load(open(tmp_path / "seme" / "config.json"))
    encoder = archs.config_entry(config, f"{encoder_settings}.layer_types")[0]
    configs = [json.load(open(f"{p}/config.json")) for p in paths]
    types = [(archs.config_entry(c, f"{encoder_settings}.layer_types")[0]["layer_types"], c["decoder"]["layer_types"])
             for c in configs]
    assert (encoder["num_hidden_layers"], config["decoder"]["num_hidden_layers"]) == (4, 3)
    assert encoder["layer_types"] == types[0][0][0:2] + types[1][0][1:3]
    assert config["decoder"]["layer_types"] == types[2][1][0:2] + types[0][1][1:2]
    moved = {"model.encoder.layers.3.self_attn.k_proj.weight": src[1]["model.encoder.layers.2.self_attn.k_proj.weight"],
             "model.decoder.layers.2.mlp.up_proj.weight": src[0]["model.decoder.layers.1.mlp.up_proj.weight"]}
    for name, tensor in moved.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(ours["model.encoder.norm.weight"], src[1]["model.encoder.norm.weight"])  # the last slice's
    run(reloaded(key, tmp_path / "seme"), key)


@pytest.mark.parametrize("key", ["t5gemma", "t5gemma:untied", "t5gemma2"])
def test_t5gemma_task_arithmetic_merge_generates(key, tmp_path):
    """T5Gemma 2's vision tower and eoi_embedding merge like any tensor; the output generates (T5Gemma 2's from a
    prompt with an image)."""
    model = merged_whole(key, tmp_path)
    ids = torch.tensor([[2, 5, 93, 93, 93, 93, 94, 7]] if key == "t5gemma2" else [[2, 5, 6, 7]])
    image = {"pixel_values": torch.randn(1, 3, 32, 32)} if key == "t5gemma2" else {}
    out = model.generate(input_ids=ids, **image, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4)  # the decoder's start token and three new ones


@pytest.mark.parametrize("key", ["git", "git:tied", "git:video"])
def test_a_git_merge_reloads_and_captions_an_image(key, tmp_path):
    """Fine-tunes of one GIT merged by task_arithmetic (every tensor: its vision tower, projector and temporal
    embeddings too) reload and caption an image (a video's frames); a `modules:` merge slices its text stack (layers
    0, 1, 1: num_hidden_layers follows, the vision tower's depth stays) beside its tower and projector merged whole."""
    image = torch.randn(1, *((2,) if key == "git:video" else ()), 3, 32, 32)
    caption = lambda model: model.generate(input_ids=torch.tensor([[1]]), pixel_values=image, max_new_tokens=3,
                                           min_new_tokens=3, do_sample=False)
    assert caption(merged_whole(key, tmp_path)).shape == (1, 4)
    paths = family(tmp_path, key)
    tuned = [{"model": p} for p in paths[1:]]
    text = {"slices": [{"sources": [{"model": p, "layer_range": [0, 2]} for p in paths]},
                       {"sources": [{"model": p, "layer_range": [1, 2]} for p in paths]}]}
    merge({"merge_method": "task_arithmetic", "dtype": "float32", "base_model": paths[0], "parameters": {"weight": 0.5},
           "modules": {"vision_tower": {"models": tuned}, "multi_modal_projector": {"models": tuned},
                       "text_decoder": text}}, tmp_path / "sliced")
    config = json.load(open(tmp_path / "sliced" / "config.json"))
    assert (config["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]) == (3, 2)
    assert caption(reloaded(key, tmp_path / "sliced")).shape == (1, 4)


def test_git_has_a_temporal_embedding_per_frame(saved):
    # one per frame of num_image_with_embedding (none without it); the Hub's video checkpoints spell them temperal,
    # as transformers 4 did: inner, in a module that transformers 5.23 does not load
    _, config, shapes = saved("git:video")
    arch = for_config(config)
    assert [n for n in shapes if "temporal" in n] == ["git.img_temporal_embedding.0", "git.img_temporal_embedding.1"]
    assert arch.role("git.img_temporal_embedding.2") is None
    assert for_config(dict(config, num_image_with_embedding=None)).role("git.img_temporal_embedding.0") is None
    hub = "git.img_temperal_embedding.1"
    assert (arch.role(hub).role, arch.part_of(hub), arch.unloaded_module(hub)) == \
        ("inner", "multi_modal_projector", "git.img_temperal_embedding.")


def test_seme_refuses_to_turn_git_in_one_line(tmp_path):
    # GIT is a decoder-only captioner, but post-LN: SeMe refuses to align a model by rotation, and merges with
    # alignment: never
    paths = family(tmp_path, "git", n=2)
    recipe = {"merge_method": "seme", "base_model": paths[0], "models": [{"model": p} for p in paths]}
    with pytest.raises(SemeError, match=r"^SeMe: aligning git models by rotation is not supported \(its norms are "
                                        r"LayerNorms[^\n]*; set alignment: never to merge without it$"):
        seme.merge(yaml.safe_dump(recipe), str(tmp_path / "refused"), progress=False)
    merge({**recipe, "parameters": {"alignment": "never"}}, tmp_path / "never")
    run(reloaded("git", tmp_path / "never"), "git")


def test_t5gemma2_hub_names():
    # the Hub's checkpoints keep the SigLIP tower under vision_model. (transformers 5.23 saves it without): inner, a
    # layer of the vision tower's stack; the encoder's text stack at model.encoder.layers, as transformers saves it
    arch = for_config({"architectures": ["T5Gemma2ForConditionalGeneration"], "model_type": "t5gemma2"})
    tower = arch.role("model.encoder.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight")
    assert (tower.role, tower.layer, arch.part_of(tower.template)) == ("inner", 3, "vision_tower")
    assert arch.part_of("model.encoder.vision_tower.vision_model.embeddings.patch_embedding.weight") == "vision_tower"
    k = arch.role("model.encoder.layers.3.self_attn.k_proj.weight")
    assert (k.role, arch.part_of(k.template)) == ("read", "encoder")
    assert k.norm == "model.encoder.layers.3.pre_self_attn_layernorm.weight"


def test_vit_gpt2_hub_names():
    # a vit-gpt2 captioner's config (transformers 4's): GPT-2's cross-attention, 12 layers deep, at the decoder's
    # names; its checkpoint keeps the cross-attention's causal-mask buffers too (constants, copied)
    arch = for_config({"architectures": ["VisionEncoderDecoderModel"], "model_type": "vision-encoder-decoder",
                       "encoder": {"model_type": "vit", "num_hidden_layers": 12, "hidden_size": 768},
                       "decoder": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12,
                                   "n_embd": 768, "add_cross_attention": True}})
    q = arch.role("decoder.transformer.h.11.crossattention.q_attn.weight")
    assert (q.role, q.layer, q.layout, q.norm) == ("read", 11, "in_out", "decoder.transformer.h.11.ln_cross_attn.weight")
    assert arch.role("decoder.transformer.h.11.crossattention.c_attn.weight").role == "inner"
    assert arch.role("decoder.transformer.h.0.crossattention.masked_bias").role == "buffer"
    assert arch.part_of("decoder.transformer.h.0.crossattention.c_proj.weight") == "decoder"
    assert arch.depth_key("decoder") == "decoder.n_layer" and arch.tied({"decoder": {}})


def test_a_composed_encoders_norms_keep_its_gain_offset():
    # the composed table's offset is the decoder's; an encoder of (1 + w) norms (Gemma's) keeps its own
    arch = for_config({"architectures": ["EncoderDecoderModel"], "model_type": "encoder-decoder",
                       "encoder": {"model_type": "gemma", "num_hidden_layers": 2},
                       "decoder": {"model_type": "bert", "is_decoder": True, "add_cross_attention": True}})
    assert arch.norm_gain_offset == 0.0
    assert arch.gain_offset("encoder.layers.1.input_layernorm.weight") == 1.0
    assert arch.gain_offset("encoder.norm.weight") == 1.0
    assert arch.gain_offset("decoder.bert.encoder.layer.1.attention.output.LayerNorm.weight") == 0.0


def test_mvp_prompts_keep_their_layers_in_place(tmp_path):
    # prompt_trans packs a block of keys and values per layer of its stack: slices that move layers are refused,
    # a merge of whole models is not
    paths = family(tmp_path, "mvp:prompt", n=2)
    with pytest.raises(SemeError, match=re.escape("modules.decoder: model.decoder.cross_attn_prompt.prompt_trans.2.bias "
                                                  "packs a block for each of its 2 layers")):
        merge(modules_recipe(paths + paths[:1], decoder_slices=True), tmp_path / "sliced")
    ours = merge({"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths]}, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    name = "model.decoder.cross_attn_prompt.prompt_trans.2.weight"
    torch.testing.assert_close(ours[name], 0.5 * src[0][name] + 0.5 * src[1][name])
    run(transformers.MvpForConditionalGeneration.from_pretrained(tmp_path / "seme"), "mvp:prompt")


@pytest.mark.parametrize("key, method, parameters", [("switch_transformers", "ties", {"weight": 0.5, "density": 0.5}),
                                                     ("nllb_moe", "task_arithmetic", {"weight": 0.5})])
def test_sparse_layers_stay_in_place(key, method, parameters, tmp_path):
    # the config's sparse steps say which layers have experts: slices that move layers are refused (the output loaded
    # with new feed-forwards); a merge of whole models is not, and reloads
    paths = family(tmp_path, key)
    with pytest.raises(SemeError, match=re.escape(f"modules.encoder: slices move, drop or repeat layers of "
                                                  f"{key}, whose layers must stay in place")):
        merge(modules_recipe(paths), tmp_path / "sliced")
    assert not (tmp_path / "sliced").exists()
    ours = merge({"merge_method": method, "dtype": "float32", "base_model": paths[0],
                  "models": [{"model": p, "parameters": parameters} for p in paths[1:]]}, tmp_path / "seme")
    assert any(".experts.expert_3." in n for n in ours)
    run(reloaded(key, tmp_path / "seme"), key)


def test_a_part_keeps_its_own_depth_key(tmp_path):
    # T5's encoder and decoder of equal depth: slicing the decoder changes num_decoder_layers alone
    paths = family(tmp_path, "t5:gated", num_decoder_layers=3)
    recipe = modules_recipe(paths, decoder_slices=True)
    recipe["modules"]["encoder"] = {"models": [{"model": paths[0], "parameters": {"weight": 1.0}}]}
    merge(recipe, tmp_path / "seme")
    config = json.load(open(tmp_path / "seme" / "config.json"))
    assert (config["num_layers"], config["num_decoder_layers"]) == (3, 3)
    recipe["modules"]["decoder"]["slices"][1]["sources"][0]["layer_range"] = [1, 3]
    merge(recipe, tmp_path / "seme2")
    config = json.load(open(tmp_path / "seme2" / "config.json"))
    assert (config["num_layers"], config["num_decoder_layers"]) == (3, 4)
    run(transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "seme2"), "t5")


def test_whole_whisper_merge(tmp_path):
    paths = family(tmp_path, "whisper")
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, (0.2, 0.3, 0.5))]}
    ours = merge(recipe, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    assert sorted(ours) == sorted(src[0])
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, 0.2 * src[0][name] + 0.3 * src[1][name] + 0.5 * src[2][name], msg=name)


@pytest.mark.parametrize("modules, message", [
    (None, "module by module with 'modules:' (encoder, decoder, shared)"),
    ({"encoder": {}, "decoder": {}}, "modules: shared of t5-gated0 not listed"),
    ({"encoder": {}, "decoder": {}, "shared": {}, "default": {}}, "modules.default: t5-gated0 has no module 'default' "
                                                                  "(its modules: decoder, encoder, shared)"),
])
def test_recipes_that_cannot_select_a_part_are_refused(modules, message, tmp_path):
    paths = family(tmp_path, "t5:gated", n=1)
    whole = {"models": [{"model": paths[0], "parameters": {"weight": 1.0}}]}
    if modules is None:  # a layer_range of the whole model: of which stack?
        recipe = {"slices": [{"sources": [{"model": paths[0], "layer_range": [0, 2]}]}]}
    else:
        recipe = {"modules": {name: whole for name in modules}}
    with pytest.raises(SemeError, match=re.escape(message)):
        seme.merge(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0}, **recipe}),
                   str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, two_vocabularies", [("bart:marian-unshared", {"target_vocab.json": "{}"}),
                                                   ("bart:marian-unshared", {"config.json": {"decoder_vocab_size": 90}}),
                                                   ("fsmt", {})])
def test_tokens_of_two_vocabularies_are_not_remapped(key, two_vocabularies, tmp_path):
    # Marian's separate source and target vocabularies, FSMT's (its config sizes each, even where a tokenizer.json
    # beside it holds one): re-mapping by the one it reads would move the other stack's rows by the wrong tokens
    from conftest import save_tokenizer

    paths = family(tmp_path, key, n=2)
    for p in paths:
        save_tokenizer(p, BART["vocab_size"])
    for file, content in two_vocabularies.items():
        if file == "config.json":
            content = json.dumps({**json.load(open(f"{paths[1]}/config.json")), **content})
        with open(f"{paths[1]}/{file}", "w") as f:
            f.write(content)
    recipe = {"merge_method": "linear", "tokenizer_source": "union",
              "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths]}
    refused = os.path.basename(paths[0 if key == "fsmt" else 1])  # (both of FSMT's models have two)
    with pytest.raises(SemeError, match=re.escape(f"config: tokenizer_source: {refused} has two vocabularies "
                                                  "(source and target)")):
        seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["vision-encoder-decoder", "encoder-decoder", "vision-encoder-decoder:gpt2",
                                 "encoder-decoder:gpt2"])
def test_two_described_models_composed_merge(key, tmp_path):
    """A whole task_arithmetic merge of fine-tunes reloads and generates; the decoder sliced as a module (layers 0, 1,
    1) deepens the decoder's config alone, and the output reloads and runs."""
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32)} if key.startswith("vision-encoder-decoder") else \
        {"input_ids": torch.arange(1, 6).unsqueeze(0)}
    assert merged_whole(key, tmp_path).generate(**inputs, max_new_tokens=3).shape[-1] > 1
    paths = [str(tmp_path / f"{key.replace(':', '-')}{i}") for i in range(3)]  # as family() saved them
    sliced = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": paths[0],
              "parameters": {"weight": 0.5}, "modules": {
                  "encoder": {"models": [{"model": p} for p in paths[1:]]},
                  "decoder": {"slices": [{"sources": [{"model": p, "layer_range": [0, 2]} for p in paths]},
                                         {"sources": [{"model": p, "layer_range": [1, 2]} for p in paths]}]}}}
    merge(sliced, tmp_path / "sliced")
    config = json.load(open(tmp_path / "sliced" / "config.json"))
    source = json.load(open(f"{paths[0]}/config.json"))
    arch = for_config(config)
    assert arch.num_layers(config) == 3 and depth(config, arch.depth_key("encoder")) == \
        depth(source, arch.depth_key("encoder"))
    assert torch.isfinite(run(reloaded(key, tmp_path / "sliced"), key).logits).all()


@pytest.mark.parametrize("key", ["vision-encoder-decoder", "encoder-decoder", "vision-encoder-decoder:gpt2",
                                 "encoder-decoder:gpt2", "t5:gated", "whisper", "mvp",
                                 "bigbird_pegasus", "led", "longt5", "switch_transformers", "prophetnet", "trocr",
                                 "pp_formulanet", "pix2struct", "nllb_moe", "pegasus_x", "fsmt", "t5gemma",
                                 "t5gemma2"])
def test_seme_refuses_an_encoder_decoder_model(key, tmp_path):
    paths = family(tmp_path, key, n=2)
    recipe = {"merge_method": "seme", "base_model": paths[0], "models": [{"model": p} for p in paths]}
    streams = "an image encoder's stream" if key in ("trocr", "pp_formulanet", "pix2struct") else "two streams joined by cross-attention"
    family_name = key.split(":")[0]
    with pytest.raises(SemeError, match=rf"^[^\n]* is no decoder-only language model with a causal LM head "
                                        rf"\({family_name}, of modules ([a-z_]+, )*(text_)?(encoder|decoder)[^\n]*"
                                        rf"{streams}[^\n]*$"):
        seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)


def test_a_decoder_saved_alone_merges_with_its_head(tmp_path):
    # BigBirdPegasusForCausalLM never ties its head (tie_key null), whatever tie_word_embeddings says: the output
    # keeps the merged head; BartForCausalLM's decoder, sliced as mergekit's modules name it, loads and runs
    paths = family(tmp_path, "mbart_decoder:bigbird_pegasus", n=2)
    assert json.load(open(f"{paths[0]}/config.json"))["tie_word_embeddings"]
    ours = merge({"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths]}, tmp_path / "seme")
    src = [load_folder(p) for p in paths]
    torch.testing.assert_close(ours["lm_head.weight"], 0.5 * src[0]["lm_head.weight"] + 0.5 * src[1]["lm_head.weight"])
    paths = family(tmp_path, "bart_decoder")
    recipe = modules_recipe(paths, decoder_slices=True)
    recipe["modules"] = {"decoder": recipe["modules"]["decoder"]}
    ours = merge(recipe, tmp_path / "sliced")
    assert json.load(open(tmp_path / "sliced" / "config.json"))["decoder_layers"] == 3
    assert torch.equal(ours["model.decoder.layers.2.fc1.weight"], load_folder(paths[0])["model.decoder.layers.1.fc1.weight"])
    run(transformers.BartForCausalLM.from_pretrained(tmp_path / "sliced"), "bart_decoder")
