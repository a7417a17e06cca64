"""Models of several layer stacks (a language decoder and a vision tower: Llava, Qwen2-VL, Gemma 3)
are merged whole, tensor by tensor, with gradients running over each stack's own layers, or module
by module (mergekit's `modules:`), each module with its own models or slices and parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import seme
from conftest import load_folder, save_tokenizer
from seme import architectures
from seme.architectures import modules
from seme.merge import main
from test_seme import random_orthogonal


def build_llava(path, seed: int, vision_layers: int = 3):
    import transformers

    config = transformers.LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=vision_layers, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=16),
        image_token_index=60, vision_feature_layer=-2)
    return save_random(path, seed, transformers.LlavaForConditionalGeneration, config)


def save_random(path, seed: int, model_class, config) -> str:
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # matrices that start at zero (Gemma 3's projector) write something
        for w in model.parameters():
            if w.ndim == 2 and not w.any():
                w.normal_(0, w.shape[0] ** -0.5)
    model.save_pretrained(path)
    return str(path)


def build_llava_nested(path, seed: int, build=build_llava) -> str:
    """A Llava (or a model `build` saves as one) as transformers 4.52 to 4.x saved it: every part under
    model., the head on top."""
    from safetensors.torch import save_file

    build(path, seed)
    renamed = {("lm_head." + k[len("language_model.lm_head."):] if k.startswith("language_model.lm_head.") else
                "model.language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.")
                else "model." + k): v for k, v in load_folder(path).items()}
    save_file(renamed, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


def build_qwen2_vl(path, seed: int):
    import transformers

    config = transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2), **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Qwen2VLForConditionalGeneration, config)


def build_gemma3(path, seed: int):
    import transformers

    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, head_dim=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    return save_random(path, seed, transformers.Gemma3ForConditionalGeneration, config)


def build_gemma4(path, seed: int):
    import transformers

    config = transformers.Gemma4Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, head_dim=8, global_head_dim=16,
                         layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=8,
                         vocab_size_per_layer_input=300),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64,
                           pooling_kernel_size=2),
        # clipped linears' bounds start infinite (real checkpoints hold finite ones)
        audio_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                          output_proj_dims=16, use_clipped_linears=False),
        boi_token_id=290, eoi_token_id=291, image_token_id=292, video_token_id=293, boa_token_id=294,
        eoa_token_index=295, audio_token_id=296)
    return save_random(path, seed, transformers.Gemma4ForConditionalGeneration, config)


def build_gemma4_unified(path, seed: int):
    """A Gemma 4 unified: no vision or audio tower; raw pixel patches of 8 x 8 (4-pixel patches merged 2 x 2) and raw
    waveform frames of 16 samples are embedded straight into the language model's stream."""
    import transformers

    config = transformers.Gemma4UnifiedConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, head_dim=8, global_head_dim=16,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=8, output_proj_dims=16),
        audio_config=dict(audio_embed_dim=16), boi_token_id=290, eoi_token_id=291, image_token_id=292,
        video_token_id=293, boa_token_id=294, eoa_token_index=295, audio_token_id=296)
    return save_random(path, seed, transformers.Gemma4UnifiedForConditionalGeneration, config)


def gemma4_pixels(side: int, patch_values: int) -> dict:
    """An image of side x side patches (each `patch_values` pixel values) and their (x, y) positions, as Gemma 4's
    image processors give them."""
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), dim=-1)
    return dict(pixel_values=torch.randn(1, side * side, patch_values, generator=torch.Generator().manual_seed(0)),
                image_position_ids=grid.reshape(1, side * side, 2))


def build_qwen2_5_vl(path, seed: int):
    import transformers

    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(QWEN_VL_TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1]), **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Qwen2_5_VLForConditionalGeneration, config)


def build_qwen3_vl(path, seed: int):
    import transformers

    config = transformers.Qwen3VLConfig(
        text_config=dict(QWEN_VL_TEXT, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0]), **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Qwen3VLForConditionalGeneration, config)


def build_mistral3(path, seed: int):
    import transformers

    config = transformers.Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64, head_dim=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=8, image_size=28, patch_size=14), tie_word_embeddings=False)
    return save_random(path, seed, transformers.Mistral3ForConditionalGeneration, config)


def build_mistral_large4(path, seed: int):
    """A Mistral Large 4, saved in Mistral's own names: a dense layer, then a mixture of experts; latent attention
    with a sparse-attention indexer in each layer."""
    import transformers

    config = transformers.MistralLarge4Config(
        text_config=dict(LLAVA_TEXT, num_key_value_heads=4, moe_intermediate_size=16, kv_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=8, n_routed_experts=4,
                         num_experts_per_tok=2, index_topk=4, index_head_dim=8, index_n_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=8, image_size=56, patch_size=14), image_token_index=10)
    return save_random(path, seed, transformers.MistralLarge4ForConditionalGeneration, config)


def build_mistral3_mistral4(path, seed: int):
    """A Mistral Small 4: Mistral 3's vision tower and projector, a DeepSeek-V3-like language model."""
    import transformers

    config = transformers.Mistral3Config(
        text_config=dict(LLAVA_TEXT, model_type="mistral4", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                         qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
                         topk_group=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=8, image_size=28, patch_size=14), tie_word_embeddings=False)
    return save_random(path, seed, transformers.Mistral3ForConditionalGeneration, config)


def build_ernie4_5_vl_moe(path, seed: int):
    """An ERNIE 4.5 VL: a dense layer, then experts for text tokens beside experts for image tokens."""
    import transformers

    config = transformers.Ernie4_5_VLMoeConfig(
        text_config=dict(LLAVA_TEXT, moe_intermediate_size=[16, 8], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
                         mlp_layer_types=["dense", "sparse"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2), tie_word_embeddings=False,
        **GLM4V_TOKENS)
    return save_random(path, seed, transformers.Ernie4_5_VLMoeForConditionalGeneration, config)


OMNI_AUDIO = dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=32, num_mel_bins=16,
                  max_source_positions=50, n_window=4)


def build_qwen2_5_omni_thinker(path, seed: int):
    """Qwen2.5-Omni's thinker: Qwen2's language model beside a vision and an audio encoder."""
    import transformers

    config = transformers.Qwen2_5OmniThinkerConfig(
        text_config=dict(QWEN_VL_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1]), audio_config=OMNI_AUDIO, audio_token_index=57,
        image_token_index=60, video_token_index=61, vision_start_token_id=62, vision_end_token_id=63,
        audio_start_token_id=58, audio_end_token_id=59)
    return save_random(path, seed, transformers.Qwen2_5OmniThinkerForConditionalGeneration, config)


def build_qwen3_omni_moe_thinker(path, seed: int):
    """Qwen3-Omni's thinker: Qwen3-MoE's language model beside a vision and an audio encoder."""
    import transformers

    config = transformers.Qwen3OmniMoeThinkerConfig(
        text_config=dict(QWEN_VL_TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0]), audio_config=dict(OMNI_AUDIO, downsample_hidden_size=8),
        audio_token_id=57, audio_start_token_id=58, audio_end_token_id=59, **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Qwen3OmniMoeThinkerForConditionalGeneration, config)


LLAVA_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=64)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, image_size=28, patch_size=14)
# an image of 28 x 56 pixels: its overview, then its two tiles with image_newline after each row of patches
LLAVA_NEXT = dict(image_token_index=60, video_token_index=61, image_grid_pinpoints=[[28, 56]])


def build_llava_next(path, seed: int, model: str = "LlavaNext"):
    import transformers

    clip = dict(SIGLIP, model_type="clip_vision_model", projection_dim=16)
    config = getattr(transformers, f"{model}Config")(text_config=dict(LLAVA_TEXT, model_type="llama"), vision_config=clip,
                                                     vision_feature_layer=-2, **LLAVA_NEXT)
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def build_llava_onevision(path, seed: int):
    import transformers

    config = transformers.LlavaOnevisionConfig(text_config=dict(LLAVA_TEXT, model_type="qwen2"), vision_config=SIGLIP,
                                               vision_feature_layer=-1, **LLAVA_NEXT)
    return save_random(path, seed, transformers.LlavaOnevisionForConditionalGeneration, config)


def build_internvl(path, seed: int):
    import transformers

    config = transformers.InternVLConfig(  # 4 x 4 patches, shuffled into 2 x 2 image tokens
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), image_token_id=60, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14))
    return save_random(path, seed, transformers.InternVLForConditionalGeneration, config)


def build_paligemma(path, seed: int):
    import transformers

    config = transformers.PaliGemmaConfig(
        text_config=dict(LLAVA_TEXT, model_type="gemma", vocab_size=300, head_dim=8),
        vision_config=dict(SIGLIP, projection_dim=32), image_token_id=260, projection_dim=32, hidden_size=32,
        tie_word_embeddings=False)
    return save_random(path, seed, transformers.PaliGemmaForConditionalGeneration, config)


def build_llama4(path, seed: int):
    import transformers

    config = transformers.Llama4Config(  # a dense layer, then a mixture of experts; 4 x 4 patches shuffled into 2 x 2
        text_config=dict(LLAVA_TEXT, model_type="llama4_text", head_dim=8, intermediate_size_mlp=64,
                         num_local_experts=2, interleave_moe_layer_step=2),
        vision_config=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, vision_output_dim=24, projector_input_dim=24,
                           projector_output_dim=24, pixel_shuffle_ratio=0.5), image_token_index=60)
    return save_random(path, seed, transformers.Llama4ForConditionalGeneration, config)


def build_idefics3(path, seed: int, model: str = "Idefics3"):
    import transformers

    config = getattr(transformers, f"{model}Config")(  # 4 x 4 patches, shuffled into 2 x 2 image tokens
        text_config=dict(LLAVA_TEXT, model_type="llama"), image_token_id=60, scale_factor=2,
        vision_config=dict(SIGLIP, model_type=f"{model.lower()}_vision", image_size=56))
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def build_aya_vision(path, seed: int, model: str = "AyaVision"):
    import transformers

    config = getattr(transformers, f"{model}Config")(  # 4 x 4 patches, shuffled into 2 x 2 image tokens
        text_config=dict(LLAVA_TEXT, model_type="cohere2", head_dim=8), vision_config=dict(SIGLIP, image_size=56),
        image_token_id=60, downsample_factor=2, alignment_intermediate_size=64, tie_word_embeddings=False)
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def build_qwen3_5(path, seed: int, moe: bool = False):
    import transformers

    text = dict(QWEN_VL_TEXT, head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
    config = getattr(transformers, "Qwen3_5MoeConfig" if moe else "Qwen3_5Config")(
        text_config=text, vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                                             out_hidden_size=32), **QWEN_VL_TOKENS)
    model = "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
    return save_random(path, seed, getattr(transformers, model), config)


def build_qwen4_exp(path, seed: int):
    """A Qwen4-Exp: Qwen3.5-MoE's vision tower beside a language model of two hyper-connected streams."""
    import transformers

    config = transformers.Qwen4ExpConfig(
        text_config=text_of("qwen4_exp_text"), vision_config=dict(depth=2, hidden_size=16, intermediate_size=32,
                                                                  num_heads=2, out_hidden_size=32), **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Qwen4ExpForConditionalGeneration, config)


def build_qwen3_vl_moe(path, seed: int, hub: bool = False):
    """A Qwen3-VL-MoE; with `hub`, its fused experts transposed to [E, in, out], as its Hub checkpoints keep them
    (transformers 5 saves them as [E, out, in], and loads both)."""
    import transformers

    from safetensors.torch import save_file

    config = transformers.Qwen3VLMoeConfig(
        text_config=dict(QWEN_VL_TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0]), **QWEN_VL_TOKENS)
    save_random(path, seed, transformers.Qwen3VLMoeForConditionalGeneration, config)
    if hub:
        save_file({k: v.mT.contiguous() if ".mlp.experts." in k else v for k, v in load_folder(path).items()},
                  f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


GLM4V_TOKENS = dict(image_token_id=60, video_token_id=61, image_start_token_id=62, image_end_token_id=63,
                   video_start_token_id=58, video_end_token_id=59)
GLM4V_VISION = dict(depth=2, hidden_size=16, intermediate_size=48, num_heads=2, out_hidden_size=32, image_size=28,
                    patch_size=14)
GLM4V_ROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}


def build_glm4v(path, seed: int, model: str = "Glm4v"):
    """A GLM-4.1V (or, as `model`, GLM-4.6V: the same parts), whose merger's down_proj writes into the stream."""
    import transformers

    config = getattr(transformers, f"{model}Config")(text_config=dict(QWEN_VL_TEXT, rope_parameters=GLM4V_ROPE),
                                                     vision_config=GLM4V_VISION, **GLM4V_TOKENS)
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def build_glm_ocr(path, seed: int):
    """A GLM-OCR: GLM-4.1V's parts, without attention biases."""
    import transformers

    config = transformers.GlmOcrConfig(text_config=dict(QWEN_VL_TEXT, head_dim=16, rope_parameters=GLM4V_ROPE),
                                       vision_config=GLM4V_VISION, **GLM4V_TOKENS)
    return save_random(path, seed, transformers.GlmOcrForConditionalGeneration, config)


def build_glm4v_moe(path, seed: int):
    """A GLM-4.5V: a dense layer, then a mixture of experts."""
    import transformers

    config = transformers.Glm4vMoeConfig(
        text_config=dict(QWEN_VL_TEXT, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         first_k_dense_replace=1, rope_parameters=GLM4V_ROPE),
        vision_config=GLM4V_VISION, **GLM4V_TOKENS)
    return save_random(path, seed, transformers.Glm4vMoeForConditionalGeneration, config)


QWEN_VL_TOKENS = dict(image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
QWEN_VL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2)


# --- batch E: more wrappers of language models with a table (text settings from test_architectures) ---

def text_of(family: str, **changes) -> dict:
    """The tiny text settings test_architectures gives `family` (a table key), with `changes`."""
    from test_architectures import FAMILIES

    return dict(FAMILIES[family][2], **changes)


def build_lfm2_vl(path, seed: int):
    import transformers

    config = transformers.Lfm2VlConfig(  # 4 x 4 patches of 4 pixels, unshuffled into 2 x 2 image tokens
        text_config=text_of("lfm2"), image_token_id=60, projector_hidden_size=24, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=4, num_patches=16))
    return save_random(path, seed, transformers.Lfm2VlForConditionalGeneration, config)


def siglip2_prompt() -> dict:  # 4 x 4 patches of 4 pixels (flattened), unshuffled into 2 x 2 image tokens
    prompt = image_prompt(60, 4, 0)
    return dict(prompt, pixel_values=torch.randn(1, 16, 48, generator=torch.Generator().manual_seed(0)),
                pixel_attention_mask=torch.ones(1, 16, dtype=torch.long), spatial_shapes=torch.tensor([[4, 4]]))


def build_lfm3_vl(path, seed: int):
    import transformers

    config = transformers.Lfm3VlConfig(  # 2 x 2 patches of 4 pixels, merged into one image token
        text_config=text_of("lfm2:lfm3"), projector_hidden_size=24, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, patch_size=4), **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Lfm3VlForConditionalGeneration, config)

def build_kimi_k25(path, seed: int):
    import transformers

    config = transformers.Kimi_K25Config(  # 2 x 2 patches of 4 pixels, merged into one image token
        text_config=text_of("deepseek_v3", model_type="deepseek_v3", n_group=1, topk_group=1), projection_hidden_size=16,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=4, pos_emb_height=4, pos_emb_width=4), tie_word_embeddings=False,
        **QWEN_VL_TOKENS)
    save_random(path, seed, transformers.Kimi_K25ForConditionalGeneration, config)
    # transformers saves its language model's layers as blocks (its vision tower's name, renamed back on load
    # in both); the Hub's checkpoints keep them as layers
    return renamed(path, lambda name: name.replace("language_model.model.blocks.", "language_model.model.layers."))


def renamed(path, rename) -> str:
    """The checkpoint at `path` with its tensors renamed by `rename`."""
    from safetensors.torch import save_file

    save_file({rename(k): v for k, v in load_folder(path).items()}, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


def patch_prompt(patch: int) -> dict:  # 2 x 2 patches (one image, [3, patch, patch] each) merged into one token
    ids = torch.tensor([[1, 5, 62, 60, 63, 9]])
    return dict(input_ids=ids, pixel_values=torch.randn(4, 3, patch, patch, generator=torch.Generator().manual_seed(0)),
                image_grid_thw=torch.tensor([[1, 2, 2]]))

def build_minicpmv(path, seed: int, version: str = "4_6", merger_times: int = 1):
    import transformers

    config = getattr(transformers, f"MiniCPMV{version}Config")(  # 4 x 4 patches, merged twice 2 x 2 into one token
        text_config=text_of("qwen3_next:qwen3_5_text", model_type="qwen3_5_text"), insert_layer_id=0,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, insert_layer_id=0), image_token_id=60, video_token_id=61,
        merger_times=merger_times)
    return save_random(path, seed, getattr(transformers, f"MiniCPMV{version}ForConditionalGeneration"), config)


def minicpmv_prompt() -> dict:  # 4 x 4 patches of 4 pixels side by side
    prompt = image_prompt(60, 1, 0)
    return dict(prompt, pixel_values=torch.randn(1, 3, 4, 64, generator=torch.Generator().manual_seed(0)),
                target_sizes=torch.tensor([[4, 4]]), mm_token_type_ids=(prompt["input_ids"] == 60).long())

def build_idefics2(path, seed: int):
    import transformers

    config = transformers.Idefics2Config(  # its perceiver resampler works in the language model's width
        text_config=dict(LLAVA_TEXT, model_type="mistral"), image_token_id=60,
        vision_config=dict(SIGLIP, model_type="idefics2_vision"),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1))
    return save_random(path, seed, transformers.Idefics2ForConditionalGeneration, config)

def build_video_llava(path, seed: int, model: str = "VideoLlava", **settings):
    import transformers

    clip = dict(SIGLIP, model_type="clip_vision_model", projection_dim=16)
    config = getattr(transformers, f"{model}Config")(text_config=dict(LLAVA_TEXT, model_type="llama"), vision_config=clip,
                                                     image_token_index=60, **settings)
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)

def build_aria(path, seed: int):
    import transformers

    config = transformers.AriaConfig(  # 2 x 2 patches, cross-attended by 2 queries
        text_config=text_of("aria_text", model_type="aria_text"), image_token_index=60,
        vision_config=dict(SIGLIP, model_type="idefics3_vision"), projector_patch_to_query_dict={4: 2})
    return save_random(path, seed, transformers.AriaForConditionalGeneration, config)

def build_exaone4_5(path, seed: int):
    import transformers

    config = transformers.Exaone4_5_Config(
        text_config=text_of("olmo2:exaone4", model_type="exaone4"), image_token_id=60, video_token_id=61,
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, num_key_value_heads=2,
                           out_hidden_size=32, fullatt_block_indexes=[1]))
    return save_random(path, seed, transformers.Exaone4_5_ForConditionalGeneration, config)


def qwen_vl_image() -> dict:  # get_image_features' inputs of qwen_vl_prompt
    prompt = qwen_vl_prompt()
    return dict(pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])

def build_janus(path, seed: int, depth: int = 2):
    """A Janus whose aligner has `depth` Linears (2 as released: fc1, then hidden_layers.0 writes)."""
    import transformers

    config = transformers.JanusConfig(
        text_config=dict(LLAVA_TEXT, model_type="llama"), image_token_id=60, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=32, num_image_tokens=4, depth=depth),
        vq_config=dict(embed_dim=4, num_embeddings=16, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, num_patches=2, projection_dim=32, image_token_embed_dim=32))
    return save_random(path, seed, transformers.JanusForConditionalGeneration, config)

def build_deepseek_vl(path, seed: int):
    import transformers

    config = transformers.DeepseekVLConfig(text_config=dict(LLAVA_TEXT, model_type="llama"), vision_config=SIGLIP,
                                           image_token_id=60, tie_word_embeddings=False)
    return save_random(path, seed, transformers.DeepseekVLForConditionalGeneration, config)

def build_ovis2(path, seed: int):
    import transformers

    config = transformers.Ovis2Config(  # 2 x 2 patches over a visual vocabulary of 16 (its last 5 indicators)
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), image_token_id=60, visual_indicator_token_ids=[55, 56, 57, 58, 59],
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, vocab_size=16), vocab_size=64, hidden_size=32,
        tie_word_embeddings=False)
    return save_random(path, seed, transformers.Ovis2ForConditionalGeneration, config)

def build_got_ocr2(path, seed: int):
    import transformers

    config = transformers.GotOcr2Config(  # 4 x 4 patches, convolved twice with stride 2 into one image token
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), image_token_index=60, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=32))
    return save_random(path, seed, transformers.GotOcr2ForConditionalGeneration, config)

def build_lighton_ocr(path, seed: int):
    import transformers

    config = transformers.LightOnOcrConfig(  # Pixtral's 4 x 4 patches, merged 2 x 2
        text_config=dict(LLAVA_TEXT, model_type="qwen3", head_dim=8), image_token_id=60, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=8, image_size=56, patch_size=14))
    return save_random(path, seed, transformers.LightOnOcrForConditionalGeneration, config)

def build_qianfan_ocr(path, seed: int):
    import transformers

    config = transformers.QianfanOCRConfig(  # 4 x 4 patches, shuffled into 2 x 2 image tokens
        text_config=dict(LLAVA_TEXT, model_type="qwen3", head_dim=8), image_token_id=60,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14))
    save_random(path, seed, transformers.QianfanOCRForConditionalGeneration, config)
    # saved as InternVL-chat's checkpoints are (language_model.model., vision_model., mlp1.), but with the
    # language model's layers renamed as the vision tower's (encoder.layers.); the Hub's keep them as layers
    return renamed(path, lambda name: name.replace("language_model.model.encoder.layers.", "language_model.model.layers."))

def build_video_llama_3(path, seed: int):
    import transformers

    config = transformers.VideoLlama3Config(
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), image_token_id=60, video_token_id=61,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4))
    return save_random(path, seed, transformers.VideoLlama3ForConditionalGeneration, config)

def build_dots3_note(path, seed: int):
    import transformers

    config = transformers.Dots3NoteConfig(  # 2 x 2 patches of 4 pixels, merged into one image token
        text_config=text_of("deepseek_v3:dots3_note_text", model_type="dots3_note_text"),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                           mlp_layer_types=["dense", "dense"], adapter_in_dim=16, adapter_out_dim=32),
        audio_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          downsample_hidden_size=8, feature_size=16, adapter_input_size=16, adapter_out_dim=32),
        image_token_id=60, video_token_id=61, audio_token_id=62)
    return save_random(path, seed, transformers.Dots3NoteForConditionalGeneration, config)

def build_minimax_m3_vl(path, seed: int):
    import transformers

    config = transformers.MiniMaxM3VLConfig(  # 2 x 2 patches of 4 pixels, merged into one image token
        text_config=text_of("minimax_m3_vl_text", model_type="minimax_m3_vl_text"), projector_hidden_size=24,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=4), image_token_index=60, video_token_index=61)
    return save_random(path, seed, transformers.MiniMaxM3SparseForConditionalGeneration, config)

def build_hyperclovax_vision_v2(path, seed: int):
    import transformers

    config = transformers.HyperCLOVAXVisionV2Config(  # Qwen2.5-VL's vision tower
        text_config=text_of("granite:hyperclovax", model_type="hyperclovax"), image_token_id=60, video_token_id=61,
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24,
                           fullatt_block_indexes=[1]), tie_word_embeddings=False)
    return save_random(path, seed, transformers.HyperCLOVAXVisionV2ForConditionalGeneration, config)

def build_nemotron_h_omni(path, seed: int):
    import transformers

    config = transformers.NemotronH_Omni_Reasoning_V3_Config(  # RADIO's 4 x 4 patches, shuffled into 2 x 2 tokens
        text_config=text_of("nemotron_h", model_type="nemotron_h"), image_token_id=60, video_token_id=61,
        vision_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16,
                           max_img_size=16, num_cls_tokens=1, num_registers=1, video_temporal_patch_size=2),
        audio_config=dict(model_type="parakeet_encoder", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, subsampling_conv_channels=8, num_mel_bins=16, projection_hidden_size=24,
                          projection_bias=False),
        vision_hidden_size=16, projector_hidden_size=24, audio_token_id=62)
    return save_random(path, seed, transformers.NemotronH_Omni_Reasoning_V3, config)


def build_step3p7(path, seed: int):
    """A Step-3.7: a dense layer, then a mixture of experts; saved in the released checkpoints' names (the language
    model at the top level beside vision_model and vit_large_projector)."""
    import transformers

    config = transformers.Step3p7Config(  # 2 x 2 patches, convolved twice into one image token
        text_config=dict(LLAVA_TEXT, head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                         share_expert_dim=24, mlp_layer_types=["dense", "sparse"], sliding_window=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14), image_token_id=60)
    return save_random(path, seed, transformers.Step3p7ForConditionalGeneration, config)


def build_granite4_vision(path, seed: int):
    """A Granite 4 Vision: Llava-NeXT's parts, with Q-Former projectors that add image features at layers 0 and 1."""
    import transformers

    config = transformers.Granite4VisionConfig(
        text_config=dict(LLAVA_TEXT), image_token_index=60, image_grid_pinpoints=[[56, 56]],
        vision_config=dict(SIGLIP, model_type="clip_vision_model", hidden_size=64, projection_dim=16, image_size=56),
        qformer_config=dict(intermediate_size=32), downsample_rate="1/2", deepstack_layer_map=[[-2, 0]],
        spatial_target_layers=[0, 1, 1, 0])
    return save_random(path, seed, transformers.Granite4VisionForConditionalGeneration, config)


def build_hunyuan_vl(path, seed: int):
    """A HunyuanOCR: its vision tower (vit) and projector (vit.perceive) beside the language model's own names."""
    import transformers

    config = transformers.HunYuanVLConfig(
        text_config=dict(LLAVA_TEXT, head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
                         tie_word_embeddings=False),
        image_token_id=60, im_start_id=61, im_end_id=62, im_newline_id=63, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                           out_hidden_size=32, text_hidden_size=32))
    return save_random(path, seed, transformers.HunYuanVLForConditionalGeneration, config)


def build_paddleocr_vl(path, seed: int):
    """A PaddleOCR-VL: Ernie 4.5's language model (with biases) beside visual and its projector, mlp_AR."""
    import transformers

    config = transformers.PaddleOCRVLConfig(
        text_config=dict(LLAVA_TEXT, head_dim=8, use_bias=True, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                           patch_size=14), tie_word_embeddings=False, **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.PaddleOCRVLForConditionalGeneration, config)


def build_molmo2(path, seed: int, **text):
    """A Molmo2, saved in its checkpoints' names (transformer.blocks, vision_backbone); a vocabulary of 56 tokens and 8
    extra ones (image markers)."""
    import transformers

    config = transformers.Molmo2Config(
        text_config=dict(LLAVA_TEXT, head_dim=8, vocab_size=56, additional_vocab_size=8, attention_bias=True, **text),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=8, image_size=[28, 28], patch_size=14),
        adapter_config=dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8, intermediate_size=24,
                            text_hidden_size=32, vision_feature_layer=[-1]),
        image_start_token_id=56, low_res_image_start_token_id=57, image_end_token_id=58, image_patch_id=59,
        frame_start_token_id=60, frame_end_token_id=61)
    return save_random(path, seed, transformers.Molmo2ForConditionalGeneration, config)


def build_glm5_next(path, seed: int):
    """A GLM-5.3-Flash: a linear-attention layer with a dense MLP, then a latent-attention layer with a sparse-attention
    indexer and a mixture of experts, over two hyper-connected residual streams."""
    import transformers

    config = transformers.Glm5NextConfig(
        text_config=dict(LLAVA_TEXT, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4,
                         num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=0, qk_nope_head_dim=8,
                         v_head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2, index_kpool=2, linear_head_dim=8,
                         linear_num_heads=4, hc_mult=2, pad_token_id=0, layer_types=["linear_attention", "full_attention"],
                         mlp_layer_types=["dense", "sparse"]),
        vision_config=GLM4V_VISION, image_token_id=60, video_token_id=61)
    return save_random(path, seed, transformers.Glm5NextForConditionalGeneration, config)

def build_cosmos3_edge(path, seed: int):
    """A Cosmos3 Edge, saved as its checkpoints keep it: the language model at the top level (to_q / to_k / to_v /
    to_out, mlp.up_proj / down_proj) beside model.visual and model.projector."""
    import transformers

    config = transformers.Cosmos3EdgeConfig(
        text_config=dict(LLAVA_TEXT, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "mrope_section": [1, 1, 2]}),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                           num_patches=16), projector_hidden_size=24, **QWEN_VL_TOKENS)
    return save_random(path, seed, transformers.Cosmos3EdgeForConditionalGeneration, config)


def build_granite_docling(path, seed: int):
    """A GraniteDocling: granite's language model under model.text_model, a connector whose coarse and fine paths each
    have a DeepStack merger (adding to layer 0's output), and a density router."""
    import transformers

    config = transformers.GraniteDoclingConfig(
        text_config=dict(LLAVA_TEXT, head_dim=8, pad_token_id=0), pad_token_id=0, image_token_id=60,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           patch_size=4, out_hidden_size=32, scale_factor=2, deepstack_visual_indexes=[0]),
        density_router_hidden_size=8)
    return save_random(path, seed, transformers.GraniteDoclingForConditionalGeneration, config)


def build_voxtral_realtime(path, seed: int):
    """A Voxtral Realtime: Mistral's language model with ada_rms_norm, nested whole as language_model. beside its
    audio_tower and multi_modal_projector; the head tied."""
    import transformers

    config = transformers.VoxtralRealtimeConfig(
        text_config=dict(LLAVA_TEXT, head_dim=8),
        audio_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
                          num_mel_bins=16))
    return save_random(path, seed, transformers.VoxtralRealtimeForConditionalGeneration, config)


# a Whisper-like audio encoder of 8 positions: 16 mel frames, halved by its second convolution
WHISPER = dict(num_hidden_layers=2, num_attention_heads=2, num_mel_bins=16, max_source_positions=8)


def build_voxtral(path, seed: int):
    """A Voxtral: Llama's language model nested whole as language_model. beside a Whisper-like audio_tower, whose
    frames the multi_modal_projector takes four at a time (intermediate_size, 4 x 16 wide)."""
    import transformers

    config = transformers.VoxtralConfig(text_config=dict(LLAVA_TEXT, head_dim=8), audio_token_id=60,
                                        audio_config=dict(WHISPER, hidden_size=16, intermediate_size=64))
    return save_random(path, seed, transformers.VoxtralForConditionalGeneration, config)


def build_qwen2_audio(path, seed: int):
    """A Qwen2-Audio: Qwen2's language model beside a Whisper-like audio_tower (its frames pooled two by two) and a
    projector of one Linear."""
    import transformers

    config = transformers.Qwen2AudioConfig(
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), audio_token_index=60,
        audio_config=dict(d_model=16, encoder_ffn_dim=32, encoder_layers=2, encoder_attention_heads=2, num_mel_bins=16,
                          max_source_positions=8))
    return save_random(path, seed, transformers.Qwen2AudioForConditionalGeneration, config)


def build_audio_flamingo(path, seed: int, model: str = "AudioFlamingo3"):
    """An AudioFlamingo3 (or MusicFlamingo, which turns the audio tower's frames by their times first): Qwen2's
    language model beside a Whisper-like audio_tower and Voxtral's projector, with biases."""
    import transformers

    config = getattr(transformers, f"{model}Config")(
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), audio_token_id=60,
        audio_config=dict(WHISPER, model_type="audioflamingo3_encoder", hidden_size=16, intermediate_size=32))
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def build_glmasr(path, seed: int, **settings):
    """A GLM-ASR: Llama's language model beside a Whisper-like audio_tower with rotary attention, whose frames its
    projector takes four at a time (intermediate_size, 4 x 16 wide), as Voxtral's, with biases; the head tied (the
    top-level config's tie_word_embeddings, as its checkpoints')."""
    import transformers

    config = transformers.GlmAsrConfig(
        text_config=dict(LLAVA_TEXT, head_dim=8), audio_token_id=60,
        audio_config=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_mel_bins=16, max_position_embeddings=8), **settings)
    return save_random(path, seed, transformers.GlmAsrForConditionalGeneration, config)


def build_granite_speech(path, seed: int, model: str = "GraniteSpeech", **settings):
    """A Granite Speech (or Granite Speech Plus, whose projector reads its first conformer layer's output beside the
    last's): granite's language model beside a conformer encoder of 3 layers, deeper than the language model, saved
    as encoder. (no marker tells it from a language model's), and a Q-Former projector whose 2 queries read each
    window of 4 frames; the head tied, as its checkpoints' is."""
    import transformers

    plus = model == "GraniteSpeechPlus"
    config = getattr(transformers, f"{model}Config")(
        text_config=dict(LLAVA_TEXT, model_type="granite"), audio_token_index=60, has_lora_adapter=False,
        encoder_config=dict(input_dim=16, num_layers=3, hidden_dim=16, num_heads=2, output_dim=8, context_size=4,
                            max_pos_emb=8, conv_kernel_size=3, **(dict(cat_hidden_layers=[1]) if plus else {})),
        projector_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              encoder_hidden_size=32 if plus else 16, cross_attention_frequency=1),
        window_size=4, downsample_rate=2, **settings)
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def build_muse(path, seed: int, model: str = "MuseGlimmer"):
    """A Muse Glimmer (or Muse Spark: its first layer's MLP dense, its second's a mixture of experts, and an audio
    tower): a sliding-window layer with RoPE, then a full-attention layer without."""
    import transformers

    spark = model == "MuseSpark"
    text = dict(LLAVA_TEXT, head_dim=8, layer_types=["sliding_attention", "full_attention"],
                layer_rope_theta=[10000.0, 0], **(dict(num_local_experts=4, num_experts_per_tok=2, moe_hidden_size=16,
                                                       moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"])
                                                  if spark else {}))
    audio = dict(audio_config=dict(hidden_sizes=[8, 16], depths=[1, 1], patch_sizes=[4, 2], num_hidden_layers=2,
                                   out_hidden_size=32)) if spark else {}
    config = getattr(transformers, f"{model}Config")(
        text_config=text, out_hidden_size=16, projector_hidden_size=24, image_token_id=60, video_token_id=61,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                           pos_emb_height=4, pos_emb_width=4), **audio)
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


DEEPSEEK_OCR_TEXT = dict(LLAVA_TEXT, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1, mlp_layer_types=["dense", "sparse"])
SAM = dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
           window_size=2, global_attn_indexes=[1], mlp_dim=32)


def build_deepseek_ocr2(path, seed: int):
    """A DeepSeek-OCR 2: a dense layer, then a mixture of experts, with multi-head attention (no latent attention);
    saved in its Hub checkpoints' names (sam_model, qwen2_model, projector beside the language model's own)."""
    import transformers

    config = transformers.DeepseekOcr2Config(  # 144 queries of its vision encoder, then view_seperator
        text_config=DEEPSEEK_OCR_TEXT, image_token_id=60, vision_config=dict(
            sam_config=dict(SAM, downsample_channels=[16, 24]),
            encoder_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2)))
    return save_random(path, seed, transformers.DeepseekOcr2ForConditionalGeneration, config)


def build_unlimited_ocr(path, seed: int):
    """An Unlimited-OCR: DeepSeek-OCR 2's language model (a reference sliding window), SAM and CLIP encoders."""
    import transformers

    config = transformers.UnlimitedOcrConfig(  # one image token, image_newline after it, then view_seperator
        text_config=dict(DEEPSEEK_OCR_TEXT, sliding_window=8), image_token_id=60, vision_config=dict(
            sam_config=dict(SAM, downsample_channels=[16, 24]),
            encoder_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=16)))
    return save_random(path, seed, transformers.UnlimitedOcrForConditionalGeneration, config)


KOSMOS_TEXT = dict(embed_dim=32, ffn_dim=64, layers=2, attention_heads=4, vocab_size=64)


def build_kosmos2(path, seed: int):
    """A Kosmos-2: a CLIP-like vision model (2 x 2 patches) whose features image_to_text_projection resamples into
    4 latent queries, which take the image tokens' places."""
    import transformers

    config = transformers.Kosmos2Config(
        text_config=KOSMOS_TEXT, latent_query_num=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14))
    return save_random(path, seed, transformers.Kosmos2ForConditionalGeneration, config)


def build_kosmos2_5(path, seed: int):
    """A Kosmos-2.5: a Pix2Struct-like vision encoder over flattened 4 x 4 patches, resampled into 4 latent queries."""
    import transformers

    config = transformers.Kosmos2_5Config(
        text_config=KOSMOS_TEXT, latent_query_num=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
                           patch_embed_hidden_size=48, max_num_patches=16))
    return save_random(path, seed, transformers.Kosmos2_5ForConditionalGeneration, config)


def kosmos_prompt(image: dict) -> dict:
    """Four image tokens (marked by image_embeds_position_mask) between text tokens."""
    return dict(image, input_ids=torch.tensor([[0, 5] + [3] * 4 + [9, 11]]),
                image_embeds_position_mask=torch.tensor([[0, 0] + [1] * 4 + [0, 0]]))


def kosmos2_5_patches() -> dict:
    """Six patches of 4 x 4 pixels in 2 rows of 3, each (row, column, pixels), as Kosmos2_5ImageProcessor flattens them."""
    rows, columns = torch.arange(1, 3).repeat_interleave(3), torch.arange(1, 4).repeat(2)
    pixels = torch.randn(6, 48, generator=torch.Generator().manual_seed(0))
    return dict(flattened_patches=torch.cat([rows[:, None], columns[:, None], pixels], 1)[None])


def build_blip(path, seed: int, model: str = "InstructBlip", text: dict | None = None):
    """A BLIP-2-like model (`model`: Blip2, InstructBlip, InstructBlipVideo): a vision model of 2 x 2 patches, a
    Q-Former of 2 query tokens (InstructBLIP's also reads the instruction, in a vocabulary of 40), its
    language_projection into a Llama (or `text`)."""
    import transformers

    token = {"video_token_index" if model == "InstructBlipVideo" else "image_token_index": 60}
    config = getattr(transformers, f"{model}Config")(
        text_config=text or dict(LLAVA_TEXT, model_type="llama"), num_query_tokens=2, **token,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        qformer_config=dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16))
    return save_random(path, seed, getattr(transformers, f"{model}ForConditionalGeneration"), config)


def blip_prompt(frames: int = 0) -> dict:
    """An image (or a video of `frames` frames), whose 2 query outputs per frame take the image tokens' places, and the
    instruction the Q-Former reads."""
    shape = (1, frames, 3, 28, 28) if frames else (1, 3, 28, 28)
    return dict(input_ids=torch.tensor([[1, 5] + [60] * 2 * max(frames, 1) + [9, 11]]),
                pixel_values=torch.randn(*shape, generator=torch.Generator().manual_seed(0)),
                qformer_input_ids=torch.tensor([[1, 4, 7]]))


def build_perception_lm(path, seed: int):
    """A PerceptionLM whose projector averages its 4 x 4 patches' features 2 x 2 into 4 image tokens; its tower, a timm
    model in its checkpoints (timm is not installed here), a CLIP vision model of transformers' own (model_args gives
    the projector its width, as a timm tower's config does)."""
    import transformers

    config = transformers.PerceptionLMConfig(
        text_config=dict(LLAVA_TEXT, model_type="llama"), image_token_id=60, projector_pooling_ratio=2,
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, model_args={"embed_dim": 16}))
    return save_random(path, seed, transformers.PerceptionLMForConditionalGeneration, config)


def build_fast_vlm(path, seed: int):
    """A FastVLM; its tower, timm's FastViT in its checkpoints (timm is not installed here), a ConvNeXt of
    transformers' own, which also gives a map of features (2 x 2 for an image of 8 x 8 pixels: 4 image tokens)."""
    import transformers

    config = transformers.FastVlmConfig(
        text_config=dict(LLAVA_TEXT, model_type="qwen2"), image_token_id=60,
        vision_config=dict(model_type="convnext", hidden_sizes=[16], depths=[1], num_stages=1, hidden_size=16))
    return save_random(path, seed, transformers.FastVlmForConditionalGeneration, config)


def build_mllama(path, seed: int):
    """A self-attention layer, then a cross-attention layer; a vision model whose output (its last layer's and two
    intermediate layers' states, 48 wide) the projector takes to the language model's width."""
    import transformers

    config = transformers.MllamaConfig(
        text_config=dict(text_of("mllama"), model_type="mllama_text_model"),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, intermediate_layers_indices=[0, 1], vision_output_dim=48,
                           image_size=28, patch_size=14, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2]]),
        image_token_index=128)  # past the head's rows, as Llama 3.2 Vision's <|image|>
    return save_random(path, seed, transformers.MllamaForConditionalGeneration, config)


def mllama_prompt() -> dict:
    """An image of two tiles (aspect ratio 1 x 2), which the tokens from the image token on attend to."""
    ids = torch.tensor([[1, 5, 128, 9, 11, 7]])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0)),
                aspect_ratio_ids=torch.tensor([[2]]), aspect_ratio_mask=torch.tensor([[[1, 1]]]),
                cross_attention_mask=(torch.arange(6) >= 2).long().view(1, 6, 1, 1).expand(1, 6, 1, 2))


def build_emu3(path, seed: int):
    """A VQ image tokenizer of 16 codes (visual tokens 100..115 of the vocabulary; <image> 99, the end of a row 98),
    which codes an image in 2 x 2 pixel blocks, beside a Llama."""
    import transformers

    codes = {f"<|visual token {i:06d}|>": 100 + i for i in range(16)}
    config = transformers.Emu3Config(
        text_config=text_of("llama:emu3_text_model"), vocabulary_map={**codes, "<image>": 99, "<|extra_200|>": 98},
        vq_config=dict(embed_dim=8, codebook_size=16, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, attn_resolutions=[], double_latent=False, temporal_downsample_factor=1,
                       hidden_size=32))
    return save_random(path, seed, transformers.Emu3ForConditionalGeneration, config)


def emu3_prompt() -> dict:  # an image of 4 x 4 pixels: 2 rows of 2 codes, each row ended by <|extra_200|>
    return dict(input_ids=torch.tensor([[1, 5] + [99] * 6 + [9, 11]]), image_sizes=torch.tensor([[4, 4]]),
                pixel_values=torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return [build_llava(root / name, seed) for seed, name in enumerate(("a", "b"))]


def recipe(models):
    return {"merge_method": "linear", "dtype": "float32", "models": [{"model": m} for m in models],
            "parameters": {"weight": 1.0}, }


def without_models(r):
    return {k: v for k, v in r.items() if k != "models"}


def test_a_multimodal_model_merges_whole_with_gradients_per_stack(llavas, tmp_path):
    import transformers

    a, b = llavas
    # a's weight runs 1 -> 0 over each stack, b's is 1 - that: each stack's last layer is b's
    seme.merge({**recipe(llavas), "models": [{"model": a, "parameters": {"weight": [1.0, 0.0]}},
                                              {"model": b, "parameters": {"weight": [0.0, 1.0]}}]},
               str(tmp_path / "gradient"), progress=False)
    gradient, wa, wb = (load_folder(p) for p in (tmp_path / "gradient", a, b))
    assert gradient.keys() == wa.keys()
    for name in wa:
        if "vision" in name and ".layers.1." in name:  # the vision tower's middle layer: t = 1/2
            torch.testing.assert_close(gradient[name], (wa[name] + wb[name]) / 2, msg=name)
            continue
        last = (".layers.2." in name and "vision" in name) or (".layers.1." in name and "language_model" in name)
        assert torch.equal(gradient[name], wb[name] if last else wa[name]), name
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "gradient")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


def assert_refused(r, message, tmp_path, capsys):
    """The command line refuses recipe `r` with one line holding `message`, and writes nothing."""
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(r))
    capsys.readouterr()
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("seme: warning")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("slices", "has several layer stacks (language_model.model.layers.* (2 layers), vision_tower.encoder.layers.* "
               "(3 layers)), which one layer_range cannot select: merge it whole with 'models:'"),
    # independent models: their language models would need turning, and their projectors with them
    ("seme", "aligning llama (in LlavaForConditionalGeneration) models by rotation is not supported (its "
             "vision projector, which writes into the language model's stream, is not described"),
    ("seme-depths", "beside its language model, the pivot vision_tower.encoder.layers.* (3 layers): SeMe matches "
                    "only the language models' layers"),
    ("seme-no-table", "SeMe aligns language models of one stack, and multimodal models whose language model has "
                      "a role table"),
    ("depths", "models merged whole must have the same layers"),
])
def test_what_a_multimodal_model_cannot_do_is_a_one_line_error(llavas, tmp_path, capsys, case, message):
    import json
    import shutil

    a, b = llavas
    if case == "slices":
        r = {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}]}
    elif case == "seme":  # a projector in a layout its description does not know
        from safetensors.torch import save_file

        other = []
        for i, model in enumerate((a, b)):
            other.append(shutil.copytree(model, tmp_path / f"other{i}"))
            save_file({k.replace("linear_2", "out"): v for k, v in load_folder(model).items()},
                      other[-1] / "model.safetensors", metadata={"format": "pt"})
        r = {"merge_method": "seme", "base_model": str(other[0]), "models": [{"model": str(other[1])}]}
    elif case == "seme-depths":
        r = {"merge_method": "seme", "base_model": a, "models": [{"model": build_llava(tmp_path / "deep", 3, 4)}]}
    elif case == "seme-no-table":  # a language model of a family seme has no table for
        unknown = []
        for i, model in enumerate((a, b)):
            unknown.append(tmp_path / f"unknown{i}")
            shutil.copytree(model, unknown[-1])
            config = json.loads((unknown[-1] / "config.json").read_text())
            config["text_config"]["model_type"] = "unknown_lm"
            (unknown[-1] / "config.json").write_text(json.dumps(config))
        r = {"merge_method": "seme", "base_model": str(unknown[0]), "models": [{"model": str(unknown[1])}]}
    else:
        r = recipe([a, build_llava(tmp_path / "deep", 3, vision_layers=4)])
    assert_refused(r, message, tmp_path, capsys)


def test_modules_merge_each_part_with_its_own_models_and_parameters(llavas, tmp_path):
    a, b = llavas
    # precedence as in mergekit: a source's parameters, its slice's, its module's, the recipe's
    seme.merge({**without_models(recipe(llavas)), "modules": {
        "text_decoder": {"models": [{"model": a, "parameters": {"weight": 0.25}}, {"model": b}],
                         "parameters": {"weight": 0.75}},
        "vision_tower": {"models": [a]},
        "multi_modal_projector": {"models": [a, b], "parameters": {"weight": 0.5}}}},
        str(tmp_path / "out"), progress=False)
    out, wa, wb = (load_folder(p) for p in (tmp_path / "out", a, b))
    assert out.keys() == wa.keys()
    for name in wa:
        if name.startswith("language_model."):
            expected = 0.25 * wa[name] + 0.75 * wb[name]
        elif name.startswith("vision_tower."):
            expected = wa[name]
        else:
            assert name.startswith("multi_modal_projector.")
            expected = (wa[name] + wb[name]) / 2
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7, msg=name)


def test_modules_that_all_list_the_same_models_equal_the_whole_merge(llavas, tmp_path):
    a, b = llavas
    models = [{"model": a, "parameters": {"weight": [1.0, 0.3]}}, {"model": b, "parameters": {"weight": 0.5}}]
    whole = {**recipe(llavas), "models": models}
    per_module = {**without_models(recipe(llavas)),
                  "modules": {m: {"models": models} for m in ("vision_tower", "multi_modal_projector", "text_decoder")}}
    seme.merge(whole, str(tmp_path / "whole"), progress=False)
    seme.merge(per_module, str(tmp_path / "modules"), progress=False)
    whole, per_module = load_folder(tmp_path / "whole"), load_folder(tmp_path / "modules")
    assert whole.keys() == per_module.keys()
    assert all(torch.equal(whole[n], per_module[n]) for n in whole)


@pytest.mark.parametrize("build, text, vision", [
    (build_llava, ("text_config", "num_hidden_layers"), ("vision_config", "num_hidden_layers")),
    (build_qwen2_vl, ("text_config", "num_hidden_layers"), ("vision_config", "depth")),
    (build_gemma3, ("text_config", "num_hidden_layers"), ("vision_config", "num_hidden_layers")),
])
def test_module_slices_change_the_depth_of_one_stack(build, text, vision, tmp_path):
    """Depth up-scaling of the language model only: its layers 0, 1, 1 from two models, the vision
    tower and projector as they were. The output loads in transformers with the new depth."""
    import json

    import transformers

    a, b = build(tmp_path / "a", 0), build(tmp_path / "b", 1)
    seme.merge({"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": b, "layer_range": [1, 2]}]}]},
        "vision_tower": {"models": [a]},
        "multi_modal_projector": {"models": [a]}}}, str(tmp_path / "out"), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config[text[0]][text[1]] == 3 and config[vision[0]][vision[1]] == source[vision[0]][vision[1]]
    for key, value in source[text[0]].items():  # per-layer lists (layer_types) follow the layers
        if isinstance(value, list) and len(value) == 2:
            assert config[text[0]][key] == [value[0], value[1], value[1]], key
    out, wa, wb = (load_folder(p) for p in (tmp_path / "out", a, b))
    layer1 = [n for n in wb if ".layers.1." in n and modules.part_of(n) == "text_decoder"]
    assert layer1 and all(torch.equal(out[n.replace(".layers.1.", ".layers.2.")], wb[n]) for n in layer1)
    assert all(torch.equal(out[n], wa[n]) for n in wa if modules.part_of(n) != "text_decoder")
    assert len(out) == len(wa) + len(layer1)
    cls = getattr(transformers, json.loads((tmp_path / "a" / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(tmp_path / "out")
    assert model.config.get_text_config().num_hidden_layers == 3


@pytest.mark.parametrize("case, message", [
    ("unknown module", "modules.vision: a has no module 'vision' (its modules: text_decoder, "
                       "multi_modal_projector, vision_tower)"),
    ("module left out", "modules: multi_modal_projector of a not listed; list every module"),
    ("twice", "modules.vision_tower: the same module as modules.vision_model"),
    ("slices of no layers", "modules.multi_modal_projector: a's multi_modal_projector has no layers: give it "
                            "'models:', not 'slices:'"),
    ("out of bounds", "modules.vision_tower: layer_range [0, 4] is out of bounds for a (3 layers in "
                      "vision_tower.encoder.layers.*)"),
    ("seme", "seme takes its sources from 'models:', not 'modules:'"),
    ("both", "give exactly one of 'models', 'slices' or 'modules'"),
    ("neither", "modules.text_decoder: give exactly one of 'models' or 'slices'"),
    ("typo", "modules.text_decoder: unknown key 'model'"),
])
def test_what_modules_cannot_do_is_a_one_line_error(llavas, tmp_path, capsys, case, message):
    a, b = llavas
    mods = {"text_decoder": {"models": [a, b]}, "vision_tower": {"models": [a, b]},
            "multi_modal_projector": {"models": [a, b]}}
    r = {"merge_method": "linear", "parameters": {"weight": 1.0}, "modules": mods}
    if case == "unknown module":
        mods["vision"] = mods.pop("vision_tower")
    elif case == "module left out":
        del mods["multi_modal_projector"]
    elif case == "twice":
        mods["vision_model"] = mods["vision_tower"]
    elif case == "slices of no layers":
        mods["multi_modal_projector"] = {"slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]}]}
    elif case == "out of bounds":
        mods["vision_tower"] = {"slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]}]}
    elif case == "seme":
        r = {"merge_method": "seme", "base_model": a, "modules": mods}
    elif case == "both":
        r["models"] = [a]
    elif case == "neither":
        mods["text_decoder"] = {"parameters": {"weight": 0.5}}
    else:
        mods["text_decoder"] = {"model": a}
    assert_refused(r, message, tmp_path, capsys)


# --- the language model's role table ----------------------------------------------------------------

def build_inkling2(path, seed: int) -> str:
    """A tiny Inkling 2 (its language model a sliding and a full attention layer), which transformers saves in its
    checkpoints' layout: the language model under model.llm. as inkling2_text keeps it, the vision tower's merger
    as model.visual.proj_in / proj_out."""
    import transformers

    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, d_rel=4, rel_extent=16,
                sliding_window_size=8, vocab_size=128, unpadded_vocab_size=128, moe_intermediate_size=16,
                n_routed_experts=4, num_experts_per_tok=2, layer_types=["hybrid_sliding", "hybrid"],
                n_layers_per_attn_res_block=1, log_scaling_n_floor=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.Inkling2Config(text_config=text, image_token_id=100, vision_config=dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=4, posemb_grid_size=4,
        projection_hidden_dim=24, text_hidden_size=32))
    return save_random(path, seed, transformers.Inkling2ForConditionalGeneration, config)


WRAPPERS = {  # the builder, and the family of its language model
    "llava": (build_llava, "llama"), "llava-nested": (build_llava_nested, "llama"),
    "gemma3": (build_gemma3, "gemma3"), "gemma4": (build_gemma4, "gemma4"),
    "gemma4_unified": (build_gemma4_unified, "gemma4"),
    "qwen2_vl": (build_qwen2_vl, "qwen2"),
    "qwen2_5_vl": (build_qwen2_5_vl, "qwen2"), "qwen3_vl": (build_qwen3_vl, "qwen3"),
    "mistral3": (build_mistral3, "mistral"), "qwen3_5": (build_qwen3_5, "qwen3_next"),
    "llava_next": (build_llava_next, "llama"),
    "llava_next_video": (lambda path, seed: build_llava_next(path, seed, "LlavaNextVideo"), "llama"),
    "llava_onevision": (build_llava_onevision, "qwen2"), "internvl": (build_internvl, "qwen2"),
    "paligemma": (build_paligemma, "gemma"), "llama4": (build_llama4, "llama4_text"),
    "idefics3": (build_idefics3, "llama"), "smolvlm": (lambda path, seed: build_idefics3(path, seed, "SmolVLM"), "llama"),
    "aya_vision": (build_aya_vision, "cohere"),
    "cohere2_vision": (lambda path, seed: build_aya_vision(path, seed, "Cohere2Vision"), "cohere"),
    "qwen3_5_moe": (lambda path, seed: build_qwen3_5(path, seed, moe=True), "qwen3_next"),
    # batch D: language models inside multimodal wrappers
    "qwen3_vl_moe": (build_qwen3_vl_moe, "qwen3_moe"),
    "qwen3_vl_moe-hub": (lambda path, seed: build_qwen3_vl_moe(path, seed, hub=True), "qwen3_moe"),
    "glm4v": (build_glm4v, "glm4"), "glm46v": (lambda path, seed: build_glm4v(path, seed, "Glm46V"), "glm4"),
    "glm4v_moe": (build_glm4v_moe, "glm4_moe"),
    "mistral_large4": (build_mistral_large4, "mistral_large4_text"), "mistral3-mistral4": (build_mistral3_mistral4,
                                                                                            "deepseek_v3"),
    "ernie4_5_vl_moe": (build_ernie4_5_vl_moe, "llama"),
    "qwen2_5_omni_thinker": (build_qwen2_5_omni_thinker, "qwen2"),
    "qwen3_omni_moe_thinker": (build_qwen3_omni_moe_thinker, "qwen3_moe"),
    "glm_ocr": (build_glm_ocr, "glm4"),
    # batch E
    "lfm2_vl": (build_lfm2_vl, "lfm2"), "lfm3_vl": (build_lfm3_vl, "lfm2"),
    "kimi_k25": (build_kimi_k25, "deepseek_v3"), "minicpmv4_6": (build_minicpmv, "qwen3_next"),
    "minicpmv4_7": (lambda path, seed: build_minicpmv(path, seed, "4_7"), "qwen3_next"),
    "idefics2": (build_idefics2, "mistral"), "video_llava": (build_video_llava, "llama"),
    "vipllava": (lambda path, seed: build_video_llava(path, seed, "VipLlava", vision_feature_layer=[-2, -1]), "llama"),
    "aria": (build_aria, "aria_text"), "exaone4_5": (build_exaone4_5, "olmo2"),
    "janus": (build_janus, "llama"), "deepseek_vl": (build_deepseek_vl, "llama"),
    "ovis2": (build_ovis2, "qwen2"), "got_ocr2": (build_got_ocr2, "qwen2"),
    "lighton_ocr": (build_lighton_ocr, "qwen3"), "qianfan_ocr": (build_qianfan_ocr, "qwen3"),
    "video_llama_3": (build_video_llama_3, "qwen2"), "dots3_note": (build_dots3_note, "deepseek_v3"),
    "minimax_m3_vl": (build_minimax_m3_vl, "minimax_m3_vl_text"),
    "hyperclovax_vision_v2": (build_hyperclovax_vision_v2, "granite"),
    "nemotron_h_omni": (build_nemotron_h_omni, "nemotron_h"),
    # batch H
    "step3p7": (build_step3p7, "step3p5"), "granite4_vision": (build_granite4_vision, "granite"),
    "hunyuan_vl": (build_hunyuan_vl, "hunyuan_v1_dense"), "paddleocr_vl": (build_paddleocr_vl, "llama"),
    "molmo2": (build_molmo2, "molmo2_text"),
    "molmo2-norm_after": (lambda path, seed: build_molmo2(path, seed, norm_after=True, qk_norm_type="olmo"), "molmo2_text"),
    "glm5_next": (build_glm5_next, "glm5_next_text"),
    # mllama, emu3, phi-4-multimodal
    "mllama": (build_mllama, "mllama"), "emu3": (build_emu3, "llama"),
    # wrappers of language models new in transformers 5.23
    "cosmos3_edge": (build_cosmos3_edge, "cosmos3_edge_text"), "granite_docling": (build_granite_docling, "granite"),
    "voxtral_realtime": (build_voxtral_realtime, "mistral"), "muse_glimmer": (build_muse, "muse_glimmer_text"),
    "qwen4_exp": (build_qwen4_exp, "qwen4_exp_text"),
    "muse_spark": (lambda path, seed: build_muse(path, seed, "MuseSpark"), "muse_spark_text"),
    # DeepSeek-OCR 2, Unlimited-OCR
    "deepseek_ocr2": (build_deepseek_ocr2, "deepseek_v2"), "unlimited_ocr": (build_unlimited_ocr, "deepseek_v2"),
    "kosmos2": (build_kosmos2, "kosmos_2_text_model"), "kosmos2_5": (build_kosmos2_5, "kosmos_2_5_text_model"),
    "inkling2": (build_inkling2, "inkling2_text"),
    # BLIP-2 (OPT), InstructBLIP (Vicuna, Flan-T5), InstructBLIP Video: their Q-Former's language_projection writes
    "blip2": (lambda path, seed: build_blip(path, seed, "Blip2", text_of("opt", model_type="opt")), "opt"),
    "instructblip": (build_blip, "llama"),
    "instructblip-t5": (lambda path, seed: build_blip(path, seed, text=dict(
        model_type="t5", d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64)), "t5"),
    "instructblipvideo": (lambda path, seed: build_blip(path, seed, "InstructBlipVideo"), "llama"),
    "perception_lm": (build_perception_lm, "llama"), "fast_vlm": (build_fast_vlm, "qwen2"),
    # audio-language models
    "voxtral": (build_voxtral, "llama"), "qwen2_audio": (build_qwen2_audio, "qwen2"),
    "audioflamingo3": (build_audio_flamingo, "qwen2"),
    "musicflamingo": (lambda path, seed: build_audio_flamingo(path, seed, "MusicFlamingo"), "qwen2"),
    "glmasr": (build_glmasr, "llama"),
    "granite_speech": (build_granite_speech, "granite"),
    "granite_speech-nested": (lambda path, seed: build_llava_nested(path, seed, build_granite_speech), "granite"),
    "granite_speech_plus": (lambda path, seed: build_granite_speech(path, seed, "GraniteSpeechPlus"), "granite"),
}


def own_name(name: str) -> str:
    """What a checkpoint of the language model alone calls a multimodal checkpoint's tensor `name`."""
    for nested in ("language_model.", "text_model."):  # the whole causal LM nested (Llava, Gemma 3, Mistral 3; Emu3)
        if name.startswith(nested) and not name.startswith("text_model.encoder."):
            return name[len(nested):]
    for nested in ("model.language_model.", "model.text_model."):  # its decoder nested beside the head (Qwen3-VL)
        if name.startswith(nested):
            own = name[len(nested):]  # HyperCLOVAX-SEED Vision keeps its head there too
            return own if own.startswith("lm_head.") else "model." + own
    return name  # Qwen2-VL: the decoder's own names beside `visual`


def tensor_names(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_multimodal_models_language_model_has_its_familys_roles(wrapper, tmp_path):
    """The language model's tensors have the roles its family's table gives them in a checkpoint of its
    own, wherever the multimodal checkpoint keeps them; the other parts have none."""
    import json

    build, family = WRAPPERS[wrapper]
    path = build(tmp_path / wrapper, 0)
    config = json.loads((tmp_path / wrapper / "config.json").read_text())
    names = tensor_names(path)
    arch = architectures.for_config(config, names)
    own = architectures.for_config(config["text_config"])  # its variant, as its settings choose it
    assert not arch.inferred and arch.name == own.name == family
    assert arch.num_layers(config) == 2 and arch.hidden_size(config) == 32
    for name in names:
        role = arch.role(name)
        if arch.beside_language(name):  # the projector's writes into the stream, where described (and reads of
            # it: Janus' generation head, which reads the language model's final norm's output)
            assert role is None if not arch.projected else role.role in (
                "inner", "write", "write_bias", "write_norm", "stream_vector", "read"), name
            assert role is None or role.role != "read" or (
                role.norm in names and arch.role(role.norm).role in ("norm", "final_norm")), name
            continue
        expected = own.role(own_name(name))
        assert role is not None and expected is not None, name
        assert (role.role, role.layer, role.layout) == (expected.role, expected.layer, expected.layout), name
        assert role.norm is None or (role.norm in names and own_name(role.norm) == expected.norm), name
    tied = not any(arch.role(n) and arch.role(n).role == "lm_head" for n in names)
    assert tied == arch.tied(config)
    for template in set(arch.tensors).union(*arch.kind_tensors.values()):  # every required tensor, at every layer
        for layer in range(2) if "{layer}" in template else [None]:  # (of its first expert), as its kind has it
            spec = arch.spec(template, layer)
            if spec is not None and not spec.optional and not (tied and spec.role == "lm_head"):
                name = template if layer is None else arch.layer_name(template, layer)
                assert name.replace("{expert}", "0") in names, template


def rotated(path, out, Q) -> str:
    """The multimodal model at `path` with its language model's stream turned by Q through its role
    table (the projector's write turning with it), saved at `out`."""
    import json
    import shutil

    from safetensors.torch import save_file

    from bench.zoo import rotate

    config = json.loads((Path(path) / "config.json").read_text())
    arch = architectures.for_config(config, tensor_names(path))
    assert arch.projected
    shutil.copytree(path, out)
    state = {k: v.double() for k, v in load_folder(path).items()}
    save_file({k: v.float().contiguous() for k, v in rotate(state, arch, Q).items()}, f"{out}/model.safetensors",
              metadata={"format": "pt"})
    return str(out)


def qwen_vl_prompt(patch: int = 14) -> dict:
    """An image of 2 x 2 patches, merged into one token between the vision start and end tokens."""
    ids = torch.tensor([[1, 5, 62, 60, 63, 9]])
    pixels = torch.randn(4, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 2, 2]]),
                mm_token_type_ids=(ids == 60).long())


def mistral3_prompt() -> dict:  # 4 x 4 patches, merged 2 x 2
    return dict(input_ids=torch.tensor([[1, 5] + [10] * 4 + [9, 11]]), image_sizes=torch.tensor([[56, 56]]),
                pixel_values=torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0)))


def llava_prompt() -> dict:  # its 4 patches take the image tokens' places
    return dict(input_ids=torch.tensor([[1, 5] + [60] * 4 + [9, 11]]),
                pixel_values=torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)))


def image_prompt(image_token: int, tokens: int, pixels: int) -> dict:
    """A square image of `pixels` pixels a side, whose `tokens` image tokens sit between text tokens."""
    return dict(input_ids=torch.tensor([[1, 5] + [image_token] * tokens + [9, 11]]),
                pixel_values=torch.randn(1, 3, pixels, pixels, generator=torch.Generator().manual_seed(0)))


def idefics3_prompt() -> dict:  # pixel values per prompt, per image
    prompt = image_prompt(60, 4, 56)
    return dict(prompt, pixel_values=prompt["pixel_values"][None])


def llava_next_prompt() -> dict:
    """An image of 28 x 56 pixels: its overview's 2 x 2 patches, then its two tiles' 2 x 4 patches with
    image_newline after each row."""
    return dict(input_ids=torch.tensor([[1, 5] + [60] * (4 + 2 * 5) + [9, 11]]), image_sizes=torch.tensor([[28, 56]]),
                pixel_values=torch.randn(1, 3, 3, 28, 28, generator=torch.Generator().manual_seed(0)))


def sound_prompt(tokens: int, *shape: int) -> dict:
    """A sound (its features of `shape`), whose `tokens` audio tokens sit between text tokens."""
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=torch.tensor([[1, 5] + [60] * tokens + [9, 11]]), input_features=features)


# builder, model class, a prompt holding an image
PROMPTS = {
    "llava": (build_llava, "LlavaForConditionalGeneration", llava_prompt),
    "llava-nested": (build_llava_nested, "LlavaForConditionalGeneration", llava_prompt),
    "mistral3": (build_mistral3, "Mistral3ForConditionalGeneration", mistral3_prompt),
    "qwen2_vl": (build_qwen2_vl, "Qwen2VLForConditionalGeneration", qwen_vl_prompt),
    "qwen2_5_vl": (build_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration", qwen_vl_prompt),
    "qwen3_vl": (build_qwen3_vl, "Qwen3VLForConditionalGeneration", lambda: qwen_vl_prompt(16)),
    "qwen3_5": (build_qwen3_5, "Qwen3_5ForConditionalGeneration", lambda: qwen_vl_prompt(16)),
    "qwen3_5_moe": (lambda path, seed: build_qwen3_5(path, seed, moe=True), "Qwen3_5MoeForConditionalGeneration",
                    lambda: qwen_vl_prompt(16)),
    "llava_next": (build_llava_next, "LlavaNextForConditionalGeneration", llava_next_prompt),
    "llava_next-nested": (lambda path, seed: build_llava_nested(path, seed, build_llava_next),
                          "LlavaNextForConditionalGeneration", llava_next_prompt),
    "llava_next_video": (WRAPPERS["llava_next_video"][0], "LlavaNextVideoForConditionalGeneration", llava_next_prompt),
    "llava_onevision": (build_llava_onevision, "LlavaOnevisionForConditionalGeneration", llava_next_prompt),
    "internvl": (build_internvl, "InternVLForConditionalGeneration", lambda: image_prompt(60, 4, 56)),
    "paligemma": (build_paligemma, "PaliGemmaForConditionalGeneration", lambda: image_prompt(260, 4, 28)),
    "llama4": (build_llama4, "Llama4ForConditionalGeneration", lambda: image_prompt(60, 4, 56)),
    "idefics3": (build_idefics3, "Idefics3ForConditionalGeneration", idefics3_prompt),
    "smolvlm": (WRAPPERS["smolvlm"][0], "SmolVLMForConditionalGeneration", idefics3_prompt),
    # batch D: language models inside multimodal wrappers (Qwen3-VL-MoE's experts as transformers 5 saves them, and
    # as the Hub keeps them)
    "qwen3_vl_moe": (build_qwen3_vl_moe, "Qwen3VLMoeForConditionalGeneration", lambda: qwen_vl_prompt(16)),
    "qwen3_vl_moe-hub": (WRAPPERS["qwen3_vl_moe-hub"][0], "Qwen3VLMoeForConditionalGeneration",
                         lambda: qwen_vl_prompt(16)),
    "glm4v_moe": (build_glm4v_moe, "Glm4vMoeForConditionalGeneration", qwen_vl_prompt),
    "mistral3-mistral4": (build_mistral3_mistral4, "Mistral3ForConditionalGeneration", mistral3_prompt),
    # batch E
    "lfm2_vl": (build_lfm2_vl, "Lfm2VlForConditionalGeneration", siglip2_prompt),
    "lfm3_vl": (build_lfm3_vl, "Lfm3VlForConditionalGeneration", lambda: qwen_vl_prompt(4)),
    "kimi_k25": (build_kimi_k25, "Kimi_K25ForConditionalGeneration", lambda: patch_prompt(4)),
    "minicpmv4_6": (build_minicpmv, "MiniCPMV4_6ForConditionalGeneration", minicpmv_prompt),
    "minicpmv4_7": (WRAPPERS["minicpmv4_7"][0], "MiniCPMV4_7ForConditionalGeneration", minicpmv_prompt),
    "video_llava": (build_video_llava, "VideoLlavaForConditionalGeneration",
                    lambda: dict(input_ids=llava_prompt()["input_ids"], pixel_values_images=llava_prompt()["pixel_values"])),
    "vipllava": (WRAPPERS["vipllava"][0], "VipLlavaForConditionalGeneration", llava_prompt),
    "aria": (build_aria, "AriaForConditionalGeneration", lambda: image_prompt(60, 2, 28)),
    "deepseek_vl": (build_deepseek_vl, "DeepseekVLForConditionalGeneration", lambda: image_prompt(60, 4, 28)),
    "ovis2": (build_ovis2, "Ovis2ForConditionalGeneration", lambda: dict(  # an image between its indicators
        image_prompt(60, 4, 28), input_ids=torch.tensor([[1, 5, 55] + [60] * 4 + [56, 9, 11]]))),
    "got_ocr2": (build_got_ocr2, "GotOcr2ForConditionalGeneration", lambda: image_prompt(60, 1, 64)),
    "lighton_ocr": (build_lighton_ocr, "LightOnOcrForConditionalGeneration",
                    lambda: dict(image_prompt(60, 4, 56), image_sizes=torch.tensor([[56, 56]]))),
    "qianfan_ocr": (build_qianfan_ocr, "QianfanOCRForConditionalGeneration", lambda: image_prompt(60, 4, 56)),
    "video_llama_3": (build_video_llama_3, "VideoLlama3ForConditionalGeneration", lambda: dict(  # 2 x 2 patches, merged
        image_prompt(60, 1, 0), pixel_values=torch.randn(4, 48, generator=torch.Generator().manual_seed(0)),
        image_grid_thw=torch.tensor([[1, 2, 2]]), image_merge_sizes=torch.tensor([2]))),
    "dots3_note": (build_dots3_note, "Dots3NoteForConditionalGeneration", lambda: dict(  # an image, then a sound
        input_ids=torch.tensor([[1, 5, 60, 9, 62, 62, 11]]), image_grid_thw=torch.tensor([[1, 2, 2]]),
        pixel_values=torch.randn(4, 48, generator=torch.Generator().manual_seed(0)),
        input_features=torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1)),
        chunk_sample_lengths=torch.tensor([2560]))),  # 16 frames of 160 samples, subsampled 8-fold: 2 tokens
    "minimax_m3_vl": (build_minimax_m3_vl, "MiniMaxM3SparseForConditionalGeneration", lambda: dict(
        image_prompt(60, 1, 0), pixel_values=torch.randn(4, 96, generator=torch.Generator().manual_seed(0)),
        image_grid_thw=torch.tensor([[1, 2, 2]]))),
    "nemotron_h_omni": (build_nemotron_h_omni, "NemotronH_Omni_Reasoning_V3", lambda: dict(  # an image, then a sound
        input_ids=torch.tensor([[1, 5] + [60] * 4 + [9] + [62] * 8 + [11]]), image_grid_hw=torch.tensor([[4, 4]]),
        pixel_values=torch.randn(16, 48, generator=torch.Generator().manual_seed(0)),  # 4 x 4 patches, shuffled 2 x 2
        input_features=torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(1)))),  # subsampled 8-fold
    # mllama, emu3, phi-4-multimodal: the image reaches the stream through the cross-attention layers alone
    "mllama": (build_mllama, "MllamaForConditionalGeneration", mllama_prompt),
    "emu3": (build_emu3, "Emu3ForConditionalGeneration", emu3_prompt),  # its image is embedded as vocabulary tokens
    # an image of 2 x 2 patches of 4 pixels (flattened, one frame), merged into one token
    "cosmos3_edge": (build_cosmos3_edge, "Cosmos3EdgeForConditionalGeneration", lambda: dict(
        qwen_vl_prompt(), pixel_values=torch.randn(4, 48, generator=torch.Generator().manual_seed(0)))),
    # DeepSeek-OCR 2, Unlimited-OCR: an image of 64 x 64 pixels
    "deepseek_ocr2": (build_deepseek_ocr2, "DeepseekOcr2ForConditionalGeneration", lambda: image_prompt(60, 145, 64)),
    "unlimited_ocr": (build_unlimited_ocr, "UnlimitedOcrForConditionalGeneration", lambda: image_prompt(60, 3, 64)),
    "instructblip": (build_blip, "InstructBlipForConditionalGeneration", blip_prompt),
    "instructblipvideo": (WRAPPERS["instructblipvideo"][0], "InstructBlipVideoForConditionalGeneration",
                          lambda: blip_prompt(frames=2)),
    "janus": (build_janus, "JanusForConditionalGeneration", lambda: image_prompt(60, 4, 28)),
    "perception_lm": (build_perception_lm, "PerceptionLMForConditionalGeneration", idefics3_prompt),
    "fast_vlm": (build_fast_vlm, "FastVlmForConditionalGeneration", lambda: image_prompt(60, 4, 8)),
    # audio-language models: a sound instead, 16 frames of 16 mel bins (the Whisper-like towers' 8 positions, grouped
    # by 4 or pooled by 2) or Granite Speech's 8 frames of 16 features (2 windows of 4, read by 2 queries each);
    # Granite Speech and GLM-ASR untied, so that a turn folds its final norm's gain into its head, and Granite Speech
    # nested as transformers 5 keeps it in memory (model.encoder, model.projector, model.language_model)
    "voxtral": (build_voxtral, "VoxtralForConditionalGeneration", lambda: sound_prompt(2, 1, 16, 16)),
    "qwen2_audio": (build_qwen2_audio, "Qwen2AudioForConditionalGeneration", lambda: dict(
        sound_prompt(4, 1, 16, 16), feature_attention_mask=torch.ones(1, 16, dtype=torch.long))),
    "audioflamingo3": (build_audio_flamingo, "AudioFlamingo3ForConditionalGeneration", lambda: dict(
        sound_prompt(4, 1, 16, 16), input_features_mask=torch.ones(1, 16, dtype=torch.long))),
    "musicflamingo": (WRAPPERS["musicflamingo"][0], "MusicFlamingoForConditionalGeneration", lambda: dict(
        sound_prompt(4, 1, 16, 16), input_features_mask=torch.ones(1, 16, dtype=torch.long))),
    "glmasr": (lambda path, seed: build_glmasr(path, seed, tie_word_embeddings=False),
               "GlmAsrForConditionalGeneration", lambda: dict(
                   sound_prompt(2, 1, 16, 16), input_features_mask=torch.ones(1, 16, dtype=torch.long))),
    "granite_speech": (lambda path, seed: build_granite_speech(path, seed, tie_word_embeddings=False),
                       "GraniteSpeechForConditionalGeneration", lambda: sound_prompt(4, 1, 8, 16)),
    "granite_speech-nested": (lambda path, seed: build_llava_nested(path, seed, PROMPTS["granite_speech"][0]),
                              "GraniteSpeechForConditionalGeneration", lambda: sound_prompt(4, 1, 8, 16)),
    "granite_speech_plus": (lambda path, seed: build_granite_speech(path, seed, "GraniteSpeechPlus",
                                                                    tie_word_embeddings=False),
                            "GraniteSpeechPlusForConditionalGeneration", lambda: sound_prompt(4, 1, 8, 16)),
}


def perturbed(path) -> str:
    """The model at `path` with its gains and biases away from their 1 / 0 init."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    save_file({k: v * (1 + 0.3 * torch.randn(v.shape, generator=g)) + 0.1 * torch.randn(v.shape, generator=g)
               if v.ndim == 1 else v for k, v in load_folder(path).items()}, f"{path}/model.safetensors",
              metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("wrapper", PROMPTS)
def test_a_rotation_by_the_roles_keeps_a_multimodal_models_function(wrapper, tmp_path):
    """The language model's roles and the projector's write are all a turn of the stream needs: the
    logits of a prompt with an image stay (a missed projector would move them by percents)."""
    import transformers

    build, model_class, prompt = PROMPTS[wrapper]
    a = perturbed(build(tmp_path / "a", 0))
    turned = rotated(a, tmp_path / "turned", random_orthogonal(32, 2).double())
    with torch.no_grad():
        expected, got = (getattr(transformers, model_class).from_pretrained(p).eval()(**prompt()).logits
                         for p in (a, turned))
    assert float((got - expected).norm() / expected.norm()) < 1e-5


# model class, what it takes beside the token ids: wrappers whose projector is not described, whose language model
# turns (batch D; ERNIE 4.5 VL's middle tokens taken as an image's, so that its image experts run)
TEXT_PROMPTS = {
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeForConditionalGeneration",
                        dict(moe_mm_token_type_ids=torch.tensor([[0, 0, 1, 1, 0, 0]]))),
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerForConditionalGeneration", {}),
    "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinkerForConditionalGeneration", {}),
    # batch H
    "step3p7": ("Step3p7ForConditionalGeneration", {}),
    "granite4_vision": ("Granite4VisionForConditionalGeneration", {}),
    "hunyuan_vl": ("HunYuanVLForConditionalGeneration", {}),
    "paddleocr_vl": ("PaddleOCRVLForConditionalGeneration", {}),
    "molmo2": ("Molmo2ForConditionalGeneration", {}),
}


@pytest.mark.parametrize("wrapper", TEXT_PROMPTS)
def test_a_rotation_by_the_roles_keeps_a_multimodal_models_text_function(wrapper, tmp_path):
    """Where the projector is not described, the language model's roles alone: turned by them, the model gives a
    prompt without an image the same logits (its projector is all that keeps it from being aligned)."""
    import json

    import transformers
    from safetensors.torch import save_file

    from bench.zoo import rotate

    a = perturbed(WRAPPERS[wrapper][0](tmp_path / "a", 0))
    arch = architectures.for_config(json.loads((Path(a) / "config.json").read_text()), tensor_names(a))
    assert arch.rotation_obstacles() == [
        "its vision projector, which writes into the language model's stream, is not described"]
    state = {k: v.double() for k, v in load_folder(a).items()}
    text = {k: v for k, v in state.items() if modules.part_of(k) == modules.TEXT}
    turned = {**state, **rotate(text, arch, random_orthogonal(32, 2).double())}
    (tmp_path / "turned").mkdir()
    (tmp_path / "turned" / "config.json").write_text((Path(a) / "config.json").read_text())
    save_file({k: v.float().contiguous() for k, v in turned.items()}, f"{tmp_path}/turned/model.safetensors",
              metadata={"format": "pt"})
    model_class, kwargs = TEXT_PROMPTS[wrapper]
    with torch.no_grad():
        expected, got = (getattr(transformers, model_class).from_pretrained(p).eval()(
            input_ids=torch.tensor([[1, 5, 9, 11, 3, 7]]), **kwargs).logits for p in (a, tmp_path / "turned"))
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def glm4v_pixels() -> dict:  # 2 x 2 patches, merged into one token
    return dict(pixel_values=torch.randn(4, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 2, 2]]))


# builder, model class, pixel values: models whose language model no turn of its stream keeps (Gemma 3's
# normalises its sublayers' outputs before the add, Cohere's norms are LayerNorms), but whose projector is
# described all the same
FEATURES = {
    "gemma3": (build_gemma3, "Gemma3ForConditionalGeneration", lambda: torch.randn(1, 3, 28, 28)),
    "aya_vision": (build_aya_vision, "AyaVisionForConditionalGeneration", lambda: torch.randn(1, 3, 56, 56)),
    "cohere2_vision": (WRAPPERS["cohere2_vision"][0], "Cohere2VisionForConditionalGeneration",
                       lambda: torch.randn(1, 3, 56, 56)),
    # batch D: language models inside multimodal wrappers (GLM-4.1V's and GLM-OCR's, as GLM-4's, normalise their
    # sublayers' outputs)
    "glm4v": (build_glm4v, "Glm4vForConditionalGeneration", glm4v_pixels),
    "glm_ocr": (build_glm_ocr, "GlmOcrForConditionalGeneration", glm4v_pixels),
    # (Mistral Large 4's indexer normalises the stream with a LayerNorm) 4 x 4 patches, merged 2 x 2
    "mistral_large4": (build_mistral_large4, "MistralLarge4ForConditionalGeneration", lambda: dict(
        pixel_values=torch.randn(1, 3, 56, 56), image_sizes=torch.tensor([[56, 56]]), vision_feature_layer=-1)),
    # batch E
    "exaone4_5": (build_exaone4_5, "Exaone4_5_ForConditionalGeneration", qwen_vl_image),
    "hyperclovax_vision_v2": (build_hyperclovax_vision_v2, "HyperCLOVAXVisionV2ForConditionalGeneration", qwen_vl_image),
    # gemma 4 (4 x 4 patches of 4 pixels, pooled 2 x 2 by its vision tower) and gemma 4 unified (2 x 2 patches of 8 x 8
    # pixels, embedded as they are)
    "gemma4": (build_gemma4, "Gemma4ForConditionalGeneration", lambda: gemma4_pixels(4, 48)),
    "gemma4_unified": (build_gemma4_unified, "Gemma4UnifiedForConditionalGeneration", lambda: gemma4_pixels(2, 192)),
}


@pytest.mark.parametrize("wrapper", FEATURES)
def test_a_projector_writes_image_features_that_turn_with_the_stream(wrapper, tmp_path):
    """The image features that take the image tokens' places in the stream, of a model turned by its roles,
    are the model's turned: its projector is described right, whatever keeps its language model from turning."""
    import json

    import transformers

    build, model_class, pixels = FEATURES[wrapper]
    a = perturbed(build(tmp_path / "a", 0))
    Q = random_orthogonal(32, 2).double()
    turned = rotated(a, tmp_path / "turned", Q)
    assert architectures.for_config(json.loads((Path(a) / "config.json").read_text()), tensor_names(a)).projected
    torch.manual_seed(0)
    x = pixels()  # pixel values, or all that get_image_features takes (the grid of Qwen2.5-VL's patches)
    inputs = x if isinstance(x, dict) else {"pixel_values": x}

    def features(path):  # the image's, or each image's (joined)
        with torch.no_grad():
            out = getattr(transformers, model_class).from_pretrained(path).eval().model.get_image_features(
                **inputs, return_dict=True).pooler_output
        return (torch.cat(out) if isinstance(out, (tuple, list)) else out).double()

    expected, got = features(a), features(turned)
    assert float((got - expected @ Q.T).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("build, write", [
    (lambda path: build_janus(path, 0, depth=3), "model.aligner.hidden_layers.0.weight"),
    (lambda path: build_minicpmv(path, 0, merger_times=2), "model.merger.mlp.0.linear_2.weight")])
def test_a_projector_deeper_than_its_description_is_not_turned(build, write, tmp_path):
    """Janus' aligner.hidden_layers.0 is its last Linear at depth 2, as released; at depth 3 hidden_layers.1 writes the
    image features instead (MiniCPM-V 4.6's merger.mlp.1 where merger_times is 2), so the model is not taken as
    projected (SeMe refuses to turn it) rather than turned wrong."""
    import json

    a = build(tmp_path / "a")
    arch = architectures.for_config(json.loads((Path(a) / "config.json").read_text()), tensor_names(a))
    assert not arch.projected and arch.role(write) is None
    assert "its vision projector, which writes into the language model's stream, is not described" in \
        arch.rotation_obstacles()


def test_a_projector_in_a_layout_its_description_does_not_know_is_not_turned(llavas):
    """Where the described projector writes are missing (another layout), the model is not taken as
    projected, so SeMe refuses to rotate it rather than leave its projector unturned."""
    import json

    config = json.loads((Path(llavas[0]) / "config.json").read_text())
    names = tensor_names(llavas[0])
    assert architectures.for_config(config, names).projected
    other = [n.replace("multi_modal_projector.linear_2", "multi_modal_projector.out") for n in names]
    arch = architectures.for_config(config, other)
    assert not arch.projected and arch.role("multi_modal_projector.out.weight") is None
    assert "its vision projector, which writes into the language model's stream, is not described" in \
        arch.rotation_obstacles()


# --- SeMe ------------------------------------------------------------------------------------------------

def fine_tune(base, path, seed: int, scale: float = 0.02) -> str:
    """`base` (a model folder) plus a small random task vector on every tensor, saved at `path`."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base, path)
    g = torch.Generator().manual_seed(seed)
    tensors = load_folder(base)
    noise = {k: scale * (v.std().nan_to_num() + 0.01) * torch.randn(v.shape, generator=g) if v.is_floating_point()
             else 0 for k, v in tensors.items()}  # counters stay (Emu3's BatchNorms' num_batches_tracked)
    save_file({k: v + noise[k] for k, v in tensors.items()}, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


def language_model(path, out) -> str:
    """The Llava at `path`'s language model, saved as a checkpoint of its own (a Llama) at `out`."""
    import json

    from safetensors.torch import save_file

    config = json.loads((path / "config.json").read_text())["text_config"]
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    save_file({own_name(k): v for k, v in load_folder(path).items() if modules.part_of(k) == modules.TEXT},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_seme_merges_a_multimodal_model(llavas, tmp_path):
    """SeMe on fine-tunes of one Llava: its language model merges as the same models' language models
    alone do; the vision tower and projector, which SeMe does not align, by SCE's rule on their task
    vectors (SeMe's Select / Compute / Erase)."""
    a = llavas[0]
    b, c = fine_tune(a, tmp_path / "b", 1), fine_tune(a, tmp_path / "c", 2)
    r = {"merge_method": "seme", "base_model": a, "models": [{"model": a}, {"model": b}, {"model": c}],
         "dtype": "float32"}
    seme.merge(r, str(tmp_path / "out"), progress=False)
    merged = load_folder(tmp_path / "out")
    alone = [language_model(Path(p), tmp_path / f"{i}-lm") for i, p in enumerate((a, b, c))]
    seme.merge({**r, "base_model": alone[0], "models": [{"model": p} for p in alone]}, str(tmp_path / "lm"),
               progress=False)
    lm, inputs = load_folder(tmp_path / "lm"), [load_folder(p) for p in (a, b, c)]
    assert merged.keys() == inputs[0].keys()
    for name, tensor in merged.items():
        if modules.part_of(name) == modules.TEXT:
            expected = lm[own_name(name)]
        else:
            expected = seme.merge_tensors("sce", [x[name] for x in inputs[1:]], base=inputs[0][name], select_topk=1.0)
        torch.testing.assert_close(tensor, expected, msg=name)
    assert not torch.equal(merged["multi_modal_projector.linear_2.weight"], inputs[0]["multi_modal_projector.linear_2.weight"])


@pytest.mark.parametrize("wrapper", ["llava", "llava_next", "qwen3_vl_moe-hub", "mllama", "emu3", "unlimited_ocr",
                                     "instructblip", "janus", "voxtral", "granite_speech"])
def test_seme_aligns_a_rotated_llava_back(wrapper, tmp_path):
    """A Llava merged with its own turned copy: SeMe recovers the turn from the heads and turns the copy's
    language model and projector back (Llava-NeXT's image_newline with them; Qwen3-VL-MoE's experts as its Hub
    checkpoints keep them, [E, in, out]; Mllama's cross-attention layers, whose image features do not turn; Unlimited-OCR's
    view_seperator and image_newline, its experts one tensor each; InstructBLIP's language_projection; Janus' aligners
    and generation head; Voxtral's audio projector; Granite Speech's, beside an audio encoder deeper than its language
    model, whose layers are no language model's), so the merge is the model."""
    a = WRAPPERS[wrapper][0](tmp_path / "a", 0)
    assert_seme_gives_the_pivot(a, rotated(a, tmp_path / "turned", random_orthogonal(32, 3).double()), tmp_path / "out")


def assert_seme_gives_the_pivot(pivot, source, out) -> None:
    """SeMe merges `source` into `pivot` (a turned copy of it, or it of a turned copy), aligning it: the merge is the
    pivot."""
    import json

    seme.merge({"merge_method": "seme", "base_model": str(pivot), "models": [{"model": str(source)}],
                "dtype": "float32"}, str(out), progress=False)
    assert json.loads((out / "seme_report.json").read_text())["sources"][0]["applied"]
    merged, expected = load_folder(out), load_folder(pivot)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


def test_seme_merges_a_multimodal_model_with_its_mtp_module(tmp_path, capsys):
    """Qwen3.5's checkpoints keep their multi-token-prediction module under mtp., beside the nested
    language model: no layer stack; SeMe keeps the pivot's (its layers read the pivot's coordinates)."""
    from safetensors.torch import save_file

    a = build_qwen3_5(tmp_path / "a", 0)
    g = torch.Generator().manual_seed(0)
    state = load_folder(a)
    last = "model.language_model.layers.1."
    state.update({"mtp.layers.0." + n[len(last):]: t.clone() for n, t in state.items() if n.startswith(last)})
    state.update({"mtp.fc.weight": torch.randn(32, 64, generator=g) / 8, "mtp.norm.weight": torch.randn(32, generator=g)})
    save_file(state, f"{a}/model.safetensors", metadata={"format": "pt"})
    b, c = fine_tune(a, tmp_path / "b", 1), fine_tune(a, tmp_path / "c", 2)
    seme.merge({"merge_method": "seme", "base_model": a, "models": [{"model": b}, {"model": c}], "dtype": "float32"},
               str(tmp_path / "out"), progress=False)
    assert "the layers after the last (mtp.*) are the pivot's" in capsys.readouterr().err
    merged = load_folder(tmp_path / "out")
    assert merged.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(merged[name], tensor) == name.startswith("mtp."), name


def test_seme_merges_gemma4_beside_its_vision_and_audio_towers(tmp_path):
    """Gemma 4's audio encoder is a part of its own (audio_tower), as its vision tower is, and its
    embed_vision / embed_audio project into the language model's stream (multi_modal_projector): SeMe
    merges the language model and the other parts tensor by tensor; the output loads and runs."""
    import transformers

    a = build_gemma4(tmp_path / "a", 0)
    b = fine_tune(a, tmp_path / "b", 1)
    seme.merge({"merge_method": "seme", "base_model": a, "models": [{"model": a}, {"model": b}], "dtype": "float32"},
               str(tmp_path / "out"), progress=False)
    merged, inputs = load_folder(tmp_path / "out"), [load_folder(p) for p in (a, b)]
    parts = {modules.part_of(n) for n in merged}
    assert parts == {modules.TEXT, "vision_tower", "audio_tower", "multi_modal_projector"}
    for name in (n for n in merged if modules.part_of(n) != modules.TEXT):
        expected = seme.merge_tensors("sce", [inputs[1][name]], base=inputs[0][name], select_topk=1.0)
        torch.testing.assert_close(merged[name], expected, msg=name)
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


def gemma4_unified_prompt() -> dict:
    """An image of 2 x 2 patches, then a sound of 3 frames, each taking its tokens' places."""
    return dict(gemma4_pixels(2, 192), input_ids=torch.tensor([[1, 5] + [292] * 4 + [9] + [296] * 3 + [11]]),
                input_features=torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1)),
                input_features_mask=torch.ones(1, 3, dtype=torch.bool))


def test_gemma4_unified_merges_end_to_end(tmp_path):
    """Fine-tunes of one Gemma 4 unified merged by task_arithmetic and by SeMe (which merges them unturned: its
    language model normalises its sublayers' outputs before the add): each output reloads in transformers, every
    tensor where the model keeps it, and generates from a prompt with an image and a sound."""
    import json

    a = perturbed(build_gemma4_unified(tmp_path / "a", 0))
    b, c = fine_tune(a, tmp_path / "b", 1), fine_tune(a, tmp_path / "c", 2)
    arch = architectures.for_config(json.loads((Path(a) / "config.json").read_text()), tensor_names(a))
    assert arch.name == "gemma4" and arch.projected and arch.rotation_obstacles() == [
        "its sublayer outputs are normalised before the residual add"]
    recipes = {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": a, "parameters": {"weight": 0.5},
                            "models": [{"model": b}, {"model": c}]},
        "seme": {"merge_method": "seme", "base_model": a, "models": [{"model": a}, {"model": b}, {"model": c}]},
    }
    for name, r in recipes.items():
        seme.merge({**r, "dtype": "float32"}, str(tmp_path / name), progress=False)
        assert load_folder(tmp_path / name).keys() == load_folder(a).keys()
        model = reloaded("Gemma4UnifiedForConditionalGeneration", tmp_path / name)
        prompt = gemma4_unified_prompt()
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, prompt["input_ids"].shape[1] + 3), name


def reloaded(model_class: str, folder):
    """The merged model in `folder` loaded as `model_class`, every tensor where the model keeps it (no key missing
    or unexpected)."""
    import transformers

    model, info = getattr(transformers, model_class).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (folder, info)
    return model.eval()


def merged_fine_tunes(a, model_class: str, tmp_path):
    """Two fine-tunes of `a` merged by task_arithmetic, reloaded as `model_class` with every tensor where the model
    keeps it (no key missing or unexpected), the output's names the input's."""
    b, c = fine_tune(a, tmp_path / "b", 1), fine_tune(a, tmp_path / "c", 2)
    seme.merge({"merge_method": "task_arithmetic", "base_model": a, "parameters": {"weight": 0.5}, "dtype": "float32",
                "models": [{"model": b}, {"model": c}]}, str(tmp_path / "merged"), progress=False)
    assert load_folder(tmp_path / "merged").keys() == load_folder(a).keys()
    return reloaded(model_class, tmp_path / "merged")


def test_a_qwen4_exp_merge_reloads_reads_an_image_and_is_refused_rotation(tmp_path, capsys):
    """Fine-tunes of one Qwen4-Exp merged by task_arithmetic with its roles (the merger's linear_fc2 a write, the vision
    tower inner; the language model's n-gram tables in their checkpoint shards): the output reloads in transformers
    with every tensor and generates from a prompt with an image; SeMe refuses in one line to align an independent
    model, for no turn of the stream commutes with its hyper-connections."""
    import json

    a = build_qwen4_exp(tmp_path / "a", 0)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    arch = architectures.for_config(config, tensor_names(a))
    assert arch.projected and all(arch.role(n) for n in tensor_names(a))
    model = merged_fine_tunes(a, "Qwen4ExpForConditionalGeneration", tmp_path)
    prompt = qwen_vl_prompt(16)
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 3)
    independent = build_qwen4_exp(tmp_path / "independent", 3)  # whose stream only a turn would align
    assert_refused({"merge_method": "seme", "base_model": a, "models": [{"model": independent}]},
                   "aligning qwen4_exp_text (in Qwen4ExpForConditionalGeneration) models by rotation is not supported "
                   "(its hyper-connections gate", tmp_path, capsys)


@pytest.mark.parametrize("wrapper", ["deepseek_ocr2", "unlimited_ocr"])
def test_a_deepseek_ocr_merge_reloads(wrapper, tmp_path):
    """Fine-tunes of one DeepSeek-OCR 2 (or Unlimited-OCR) merged by task_arithmetic: the output keeps the Hub's names,
    reloads in transformers with every tensor where the model keeps it, and reads an image."""
    build, model_class, prompt = PROMPTS[wrapper]
    model = merged_fine_tunes(build(tmp_path / "a", 0), model_class, tmp_path)
    with torch.no_grad():
        assert torch.isfinite(model(**prompt()).logits).all()


KOSMOS = {  # the model class, and an image it reads
    "kosmos2": ("Kosmos2ForConditionalGeneration",
                lambda: dict(pixel_values=torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)))),
    "kosmos2_5": ("Kosmos2_5ForConditionalGeneration", kosmos2_5_patches),
}


@pytest.mark.parametrize("wrapper", KOSMOS)
def test_a_kosmos_merge_reloads_and_reads_an_image(wrapper, tmp_path, capsys):
    """Fine-tunes of one Kosmos-2 (or Kosmos-2.5) merged by task_arithmetic with their roles (image_to_text_projection's
    out_proj a write, the rest beside the language model inner): the output reloads in transformers with every tensor
    and generates from a prompt with an image; SeMe refuses in one line to align an independent model, for their
    LayerNorms cannot turn."""
    build, family = WRAPPERS[wrapper]
    model_class, image = KOSMOS[wrapper]
    a = build(tmp_path / "a", 0)
    model = merged_fine_tunes(a, model_class, tmp_path)
    prompt = kosmos_prompt(image())
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 3)
    independent = build(tmp_path / "independent", 3)  # whose stream only a turn would align
    assert_refused({"merge_method": "seme", "base_model": a, "models": [{"model": independent}]},
                   f"aligning {family} (in {model_class}) models by rotation is not supported", tmp_path, capsys)


@pytest.mark.parametrize("wrapper", KOSMOS)
def test_a_kosmos_text_decoder_sliced_by_module_reloads_with_its_new_depth(wrapper, tmp_path):
    """A frankenmerge of Kosmos' language model (layers [0, 2) of a, then [1, 2) of b; the vision model and projector
    a's) writes its new depth under text_config.layers, the name Kosmos' table gives it, and reloads, reading an
    image."""
    import json

    build, _ = WRAPPERS[wrapper]
    model_class, image = KOSMOS[wrapper]
    a, b = build(tmp_path / "a", 0), build(tmp_path / "b", 1)
    seme.merge({"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": b, "layer_range": [1, 2]}]}]},
        "vision_tower": {"models": [a]}, "multi_modal_projector": {"models": [a]}}}, str(tmp_path / "out"), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["layers"] == 3 and config["vision_config"]["num_hidden_layers"] == 2
    out, wb = load_folder(tmp_path / "out"), load_folder(b)
    layer1 = [n for n in wb if n.startswith("text_model.model.layers.1.")]
    assert layer1 and all(torch.equal(out[n.replace(".layers.1.", ".layers.2.")], wb[n]) for n in layer1)
    model = reloaded(model_class, tmp_path / "out")
    assert len(model.text_model.model.layers) == 3
    prompt = kosmos_prompt(image())
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape == (1, prompt["input_ids"].shape[1] + 3)


def test_janus_generates_image_codes_in_a_turned_stream(tmp_path):
    """Janus' image generation turns with its stream: a copy turned by its roles (generation_aligner's last Linear a
    write, generation_head's proj_out a read of the final norm's output, whose gain, away from 1, it folds) scores the
    next image code after a few codes as the model does; SeMe aligns the model to the turned copy (the pivot), its
    generation head folding its own final norm's gain before it turns, so the merge is that copy."""
    import transformers

    a = perturbed(build_janus(tmp_path / "a", 0))
    turned = rotated(a, tmp_path / "turned", random_orthogonal(32, 2).double())
    assert_seme_gives_the_pivot(turned, a, tmp_path / "out")

    def scores(path):
        model = transformers.JanusForConditionalGeneration.from_pretrained(path).eval()
        with torch.no_grad():
            embeds = model.prepare_embeddings_for_image_generation(torch.tensor([[3, 7, 1, 12]]))
            return model.model.generation_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)

    expected, got = scores(a), scores(turned)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_idefics2s_image_features_end_in_its_perceivers_norm(tmp_path, capsys):
    """Idefics2's image features are its perceiver resampler's final RMSNorm's output (its table's write_norm, a gain
    over the stream): its gain scales them channel by channel, which no turn of the stream keeps, so SeMe refuses in
    one line to align an independent model."""
    import json

    import transformers

    a = perturbed(build_idefics2(tmp_path / "a", 0))
    arch = architectures.for_config(json.loads((Path(a) / "config.json").read_text()), tensor_names(a))
    [name] = [n for n in tensor_names(a) if arch.role(n).role == "write_norm"]
    model = transformers.Idefics2ForConditionalGeneration.from_pretrained(a).eval()
    pixels = torch.randn(1, 1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    norm = model.get_parameter(name)
    features = lambda: torch.cat(model.model.get_image_features(pixels, return_dict=True).pooler_output)  # per image
    with torch.no_grad():
        scaled, gain = features(), norm.clone()
        norm.fill_(1.0)
        torch.testing.assert_close(scaled, features() * gain)
    independent = build_idefics2(tmp_path / "independent", 3)
    assert_refused({"merge_method": "seme", "base_model": a, "models": [{"model": independent}]},
                   "aligning mistral (in Idefics2ForConditionalGeneration) models by rotation is not supported (its "
                   "sublayer outputs are normalised before the residual add", tmp_path, capsys)


def build_diffusion_gemma(path, seed: int):
    """A DiffusionGemma: Gemma 4's vision tower and embedder in its encoder, its language model's layers (26B-A4B's:
    a dense MLP beside experts) shared by encoder and decoder."""
    import transformers

    config = transformers.DiffusionGemmaConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, head_dim=8, global_head_dim=16,
                         layer_types=["sliding_attention", "full_attention"], num_experts=4, top_k_experts=2,
                         moe_intermediate_size=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64,
                           pooling_kernel_size=2), boi_token_id=290, eoi_token_id=291, image_token_id=292)
    return save_random(path, seed, transformers.DiffusionGemmaForBlockDiffusion, config)


def test_diffusion_gemma_merges_and_its_image_features_turn_with_the_stream(tmp_path, capsys):
    """DiffusionGemma's embed_vision writes image features that turn with the stream (its language model, Gemma 4's,
    cannot turn); fine-tunes merged by task_arithmetic reload, every tensor where the model keeps it, and refine a
    canvas over a prompt with an image (4 x 4 patches pooled 2 x 2); SeMe refuses it in one line, for its encoder's
    layer_scalar buffers are a layer stack beside the decoder's."""
    import json

    import transformers

    a = perturbed(build_diffusion_gemma(tmp_path / "a", 0))
    arch = architectures.for_config(json.loads((Path(a) / "config.json").read_text()), tensor_names(a))
    assert arch.name == "diffusion_gemma" and arch.projected
    Q = random_orthogonal(32, 2).double()
    turned = rotated(a, tmp_path / "turned", Q)

    def features(path):
        model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
        with torch.no_grad():
            return model.model.encoder.get_image_features(**gemma4_pixels(4, 48), return_dict=True).pooler_output.double()

    expected, got = features(a), features(turned)
    assert float((got - expected @ Q.T).norm() / expected.norm()) < 1e-5
    b = fine_tune(a, tmp_path / "b", 1)
    seme.merge({"merge_method": "task_arithmetic", "base_model": a, "parameters": {"weight": 0.5}, "models": [{"model": b}],
                "dtype": "float32"}, str(tmp_path / "merged"), progress=False)
    assert load_folder(tmp_path / "merged").keys() == load_folder(a).keys()
    model = reloaded("DiffusionGemmaForBlockDiffusion", tmp_path / "merged")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 5, 290] + [292] * 4 + [291, 9]]), **gemma4_pixels(4, 48),
                              decoder_input_ids=torch.tensor([[7, 8, 9]])).logits
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()
    assert_refused({"merge_method": "seme", "base_model": a, "models": [{"model": b}]},
                   "has several layer stacks (model.decoder.layers.* (2 layers), model.encoder.language_model.layers.* "
                   "(2 layers)", tmp_path, capsys)


@pytest.mark.parametrize("wrapper", ["mllama", "emu3"])
def test_a_wrapper_beside_whose_language_model_nothing_writes_merges_end_to_end(wrapper, tmp_path):
    """Fine-tunes of one Llama 3.2 Vision (or Emu3) merged by task_arithmetic and by SeMe, and Llama 3.2 Vision's
    language model up-scaled by module slices (layers 0, 1, 1: the cross-attention layer repeated,
    cross_attention_layers following it): each output reloads in transformers and generates from a prompt with an
    image."""
    import json

    build, model_class, prompt = PROMPTS[wrapper]
    a = perturbed(build(tmp_path / "a", 0))
    b, c = fine_tune(a, tmp_path / "b", 1), fine_tune(a, tmp_path / "c", 2)
    recipes = {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": a, "parameters": {"weight": 0.5},
                            "models": [{"model": b}, {"model": c}]},
        "seme": {"merge_method": "seme", "base_model": a, "models": [{"model": a}, {"model": b}, {"model": c}]},
    }
    if wrapper == "mllama":
        recipes["slices"] = {"merge_method": "passthrough", "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": b, "layer_range": [0, 2]}]},
                                        {"sources": [{"model": c, "layer_range": [1, 2]}]}]},
            "vision_tower": {"models": [a]}, "multi_modal_projector": {"models": [a]}}}
    for name, r in recipes.items():
        seme.merge({**r, "dtype": "float32"}, str(tmp_path / name), progress=False)
        config = json.loads((tmp_path / name / "config.json").read_text())["text_config"]
        assert config.get("cross_attention_layers") == {"mllama": [1, 2] if name == "slices" else [1]}.get(wrapper)
        model = reloaded(model_class, tmp_path / name)
        ids = prompt()["input_ids"]
        out = model.generate(**prompt(), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 3), name


@pytest.mark.parametrize("wrapper", ["cosmos3_edge", "granite_docling", "voxtral_realtime", "muse_glimmer", "muse_spark",
                                     "inkling2", "idefics2", "blip2", "instructblip", "instructblip-t5",
                                     "instructblipvideo", "janus", "perception_lm", "fast_vlm"])
def test_a_wrapper_of_a_new_language_model_merges_and_reloads(wrapper, tmp_path):
    """Fine-tunes of one wrapper merged by task_arithmetic with its roles (no tensor left to names alone): the output
    reloads in transformers with every tensor it expects; SeMe refuses to turn those whose stream no turn keeps."""
    import json

    build, _ = WRAPPERS[wrapper]
    a = build(tmp_path / "a", 0)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    arch = architectures.for_config(config, tensor_names(a))
    assert arch.projected and all(arch.role(n) for n in tensor_names(a))
    turns = ("cosmos3_edge", "instructblip", "instructblipvideo", "janus", "perception_lm", "fast_vlm")
    assert bool(arch.rotation_obstacles()) == (wrapper not in turns)
    merged_fine_tunes(a, config["architectures"][0], tmp_path)


AUDIO = ["voxtral", "qwen2_audio", "audioflamingo3", "musicflamingo", "glmasr", "granite_speech",
         "granite_speech_plus"]


@pytest.mark.parametrize("wrapper", AUDIO)
def test_an_audio_language_model_merges_reloads_and_reads_a_sound(wrapper, tmp_path):
    """Fine-tunes of one audio-language model merged by task_arithmetic and by SeMe with its roles (every tensor has
    one: its audio tower and the projector's first layers inner, the projector's last Linear the write; SeMe merges
    those by SCE's rule, Granite Speech's encoder layers past its language model's depth too): each output reloads in
    transformers with every tensor where the model keeps it and generates from a prompt holding a sound."""
    import json

    build, model_class, prompt = PROMPTS[wrapper]
    a = build(tmp_path / "a", 0)
    arch = architectures.for_config(json.loads((tmp_path / "a" / "config.json").read_text()), tensor_names(a))
    assert arch.projected and all(arch.role(n) for n in tensor_names(a)) and not arch.rotation_obstacles()
    b, c = fine_tune(a, tmp_path / "b", 1), fine_tune(a, tmp_path / "c", 2)
    recipes = {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": a, "parameters": {"weight": 0.5},
                            "models": [{"model": b}, {"model": c}]},
        "seme": {"merge_method": "seme", "base_model": a, "models": [{"model": a}, {"model": b}, {"model": c}]},
    }
    for name, r in recipes.items():
        seme.merge({**r, "dtype": "float32"}, str(tmp_path / name), progress=False)
        model = reloaded(model_class, tmp_path / name)
        out = model.generate(**prompt(), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, prompt()["input_ids"].shape[1] + 3), name
    merged, inputs = load_folder(tmp_path / "seme"), [load_folder(p) for p in (a, b, c)]
    for name, tensor in merged.items():
        if arch.beside_language(name) and tensor.is_floating_point():
            expected = seme.merge_tensors("sce", [x[name] for x in inputs[1:]], base=inputs[0][name], select_topk=1.0)
            torch.testing.assert_close(tensor, expected, msg=name)


def test_granite_speechs_encoder_is_the_audio_tower_its_wrapper_declares(tmp_path, capsys):
    """Granite Speech's conformer, saved as encoder. (a name no part marker tells from a language model's), is the
    audio_tower that projectors.json declares for its wrapper: a layer_range of the whole model is refused in one line,
    and `modules:` up-scales the encoder alone (its layers 0-2, then a fine-tune's 1-2, its input_linear from the first
    slice), encoder_config.num_layers following, beside its language model and projector merged whole; the output
    reloads and reads a sound."""
    import json

    a = build_granite_speech(tmp_path / "a", 0)
    b = fine_tune(a, tmp_path / "b", 1)
    assert_refused({"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}]},
                   "has several layer stacks (encoder.layers.* (3 layers), language_model.model.layers.* (2 layers), "
                   "projector.qformer.encoder.layer.* (1 layers)), which one layer_range cannot select", tmp_path,
                   capsys)
    seme.merge({"merge_method": "passthrough", "dtype": "float32", "modules": {
        "audio_tower": {"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                                   {"sources": [{"model": b, "layer_range": [1, 3]}]}]},
        "text_decoder": {"models": [a]}, "multi_modal_projector": {"models": [a]}}}, str(tmp_path / "out"),
        progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["encoder_config"]["num_layers"], config["text_config"]["num_hidden_layers"]) == (5, 2)
    merged, inputs = load_folder(tmp_path / "out"), [load_folder(p) for p in (a, b)]
    torch.testing.assert_close(merged["encoder.input_linear.weight"], inputs[0]["encoder.input_linear.weight"])
    torch.testing.assert_close(merged["encoder.layers.4.attn.to_q.weight"],
                               inputs[1]["encoder.layers.2.attn.to_q.weight"])
    model = reloaded("GraniteSpeechForConditionalGeneration", tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(**PROMPTS["granite_speech"][2]()).logits).all()


def test_semantic_bases_weigh_a_muse_head_by_its_final_norms_own_gain(tmp_path):
    """Muse Glimmer's layers' RMSNorms multiply by (1 + w), its final norm by w itself (its own gain_offset 0.0):
    the head SeMe derives its semantic bases from is the LM head times w, not times (1 + w)."""
    from seme import config as recipe_config
    from seme.plan import make_plan

    a, b = build_muse(tmp_path / "a", 0), build_muse(tmp_path / "b", 1)
    recipe = {"merge_method": "seme", "base_model": a, "models": [{"model": b}], "parameters": {"alignment": "never"}}
    docs, base_dir, path = recipe_config.documents(recipe)
    plan = make_plan(recipe_config.validate(*docs[0], base_dir, path))
    sp = plan.semantic
    head, gain = sp.head_names[sp.pivot]
    assert (head, gain) == ("lm_head.weight", "model.language_model.norm.weight")
    state = load_folder(a)
    torch.testing.assert_close(sp.prepare(plan, torch.device("cpu")).bases[sp.pivot].W(), state[head] * state[gain])


# --- vocabulary re-mapping ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def renumbered_llavas(tmp_path_factory):
    """A Llava with a tokenizer, and the same model with its image token (id 60, 'w57') at id 4."""
    root = tmp_path_factory.mktemp("llava-vocab")
    from test_vocabulary import renumbered

    a = build_llava(root / "a", 0)
    save_tokenizer(a, 64)
    return a, renumbered(a, root / "b", "w57", "w1")


@pytest.mark.parametrize("per_module", [False, True])
@pytest.mark.parametrize("source", ["base", "b"])
def test_a_multimodal_models_vocabulary_is_remapped_with_its_image_token(renumbered_llavas, tmp_path, per_module,
                                                                          source):
    import json

    import transformers

    a, b = renumbered_llavas
    # b is a with two tokens renumbered: merged in a's vocabulary it is a, in b's a is b
    r = {**recipe([a, b]), "tokenizer_source": "base" if source == "base" else b}
    if per_module:
        r = {**without_models(r), "modules": {m: {"models": [{"model": a}, {"model": b}]}
                                              for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    seme.merge(r, str(tmp_path / "out"), progress=False)
    target = a if source == "base" else b
    merged, expected = load_folder(tmp_path / "out"), load_folder(target)
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-7, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_token_index"] == (60 if source == "base" else 4)
    assert config["text_config"]["vocab_size"] == 64
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("w57") == config["image_token_index"]
    transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")


def test_an_image_token_the_output_vocabulary_lacks_is_a_one_line_error(renumbered_llavas, tmp_path, capsys):
    import shutil

    a, _ = renumbered_llavas
    short = tmp_path / "short"
    shutil.copytree(a, short)
    save_tokenizer(short, 60)  # no 'w57'
    r = {**recipe([a, str(short)]), "tokenizer_source": str(short)}
    assert_refused(r, "the output vocabulary has no 'w57', the base model's image_token_index", tmp_path, capsys)


def image_code(code: int) -> str:
    """The name of the token of Chameleon's VQ-VAE code `code` (its digits as letters A..J, after IMGIMG, then Z)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def build_chameleon(path, seed: int, words: list[str]) -> str:
    """A Chameleon whose tokenizer and config's vocabulary_map both give `words` their positions as ids: <image>, and
    the tokens of its VQ-VAE's 16 codes (an image of 32 x 32 pixels is 256 codes)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)
    config = transformers.ChameleonConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(words), vocabulary_map=vocab, vq_config=dict(
            embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
            attn_resolutions=[16], resolution=32, latent_channels=8))
    return save_random(path, seed, transformers.ChameleonForConditionalGeneration, config)


CHAMELEON_IMAGE = ["<image>"] + [image_code(code) for code in range(16)]


@pytest.fixture(scope="module")
def chameleons(tmp_path_factory):
    """Two Chameleons of different vocabularies: b lacks a's w40..w43, has x0..x3, and keeps its image tokens last."""
    root = tmp_path_factory.mktemp("chameleon-vocab")
    special = ["<pad>", "<s>", "</s>"]
    a = build_chameleon(root / "a", 0, special + CHAMELEON_IMAGE + [f"w{i}" for i in range(44)])
    b = build_chameleon(root / "b", 1, special + [f"w{i}" for i in range(40)] + [f"x{i}" for i in range(4)]
                        + CHAMELEON_IMAGE)
    return a, b


@pytest.mark.parametrize("source", ["union", "b"])
def test_chameleons_vocabulary_map_follows_the_output_vocabulary(chameleons, source, tmp_path):
    """Merged in the union of their vocabularies (a's ids, then b's new tokens) or in b's, the output's
    vocabulary_map gives each of a's tokens the output tokenizer's id (dropping those it lacks), its image_token_id
    is <image>'s, and the model reloads and reads an image whose codes become image tokens."""
    import json

    import transformers

    a, b = chameleons
    seme.merge({**recipe([a, b]), "parameters": {"weight": 0.5}, "tokenizer_source": "union" if source == "union" else b},
               str(tmp_path / "out"), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tokenizer.get_vocab()
    kept = {token for token in json.loads((Path(a) / "config.json").read_text())["vocabulary_map"] if token in vocab}
    assert len(kept) == (64 if source == "union" else 60)
    assert config["vocabulary_map"] == {token: vocab[token] for token in kept}
    assert config["image_token_id"] == vocab["<image>"] and config["vocab_size"] == len(vocab)
    model = reloaded("ChameleonForConditionalGeneration", tmp_path / "out")
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = model.model.get_image_tokens(pixels)
        assert all(token.startswith("IMGIMG") for token in tokenizer.convert_ids_to_tokens(image[0].tolist()))
        ids = torch.tensor([[vocab["<s>"], vocab["w5"]] + [vocab["<image>"]] * image.shape[1] + [vocab["w9"]]])
        assert torch.isfinite(model(input_ids=ids, pixel_values=pixels).logits).all()


def test_an_image_code_the_output_vocabulary_lacks_is_a_one_line_error(chameleons, tmp_path, capsys):
    a, _ = chameleons
    short = build_chameleon(tmp_path / "short", 2, ["<pad>", "<s>", "</s>"] + CHAMELEON_IMAGE[:-1] + ["w0"])
    r = {**recipe([a, short]), "tokenizer_source": short}
    assert_refused(r, f"the output vocabulary has no {image_code(15)!r}, the base model's vocabulary_map entry",
                   tmp_path, capsys)
# --- Inkling ------------------------------------------------------------------------------------------------

def build_inkling(path, seed: int) -> str:
    """A tiny Inkling with its image and audio towers (a sliding and a full attention layer, a dense MLP and experts),
    which transformers saves in its checkpoints' own layout (model.llm., fused w13)."""
    import transformers

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, d_rel=4,
                rel_extent=16, sliding_window_size=8, vocab_size=128, moe_intermediate_size=16, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=2, layer_types=["hybrid_sliding", "hybrid"],
                mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.InklingConfig(
        text_config=text, vision_config=dict(hidden_size=16, num_hidden_layers=3, patch_size=4, temporal_patch_size=2),
        audio_config=dict(n_mel_bins=4, mel_vocab_size=8), image_token_id=100, audio_token_id=101,
        image_bos_token_id=102, audio_bos_token_id=103)
    return save_random(path, seed, transformers.InklingForConditionalGeneration, config)


def inkling_prompt() -> dict:  # two image patches (a token each) and three audio frames between text tokens
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.tensor([[1, 5, 102, 100, 100, 9, 103, 101, 101, 101, 11]]),
                pixel_values=torch.randn(2, 2, 4, 4, 3, generator=g),
                audio_input_ids=torch.randint(0, 8, (1, 3, 4), generator=g))


def test_inkling_keeps_its_language_model_in_its_own_layout_and_merges(tmp_path):
    """Inkling's checkpoints keep its language model in the original layout (model.llm.), which transformers renames on
    load: each tensor it renames plainly has the role inkling_text gives the name it gets in memory; beside it, the
    image and audio towers' features are normalised over the stream's width as they take their tokens' places
    (write_norm), so SeMe would not turn it. Fine-tunes merged by task_arithmetic reload with every tensor and generate
    from a prompt with an image and a sound."""
    import json

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    a = build_inkling(tmp_path / "a", 0)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    names = tensor_names(a)
    arch = architectures.for_config(config, names)
    assert arch.name == "inkling_mm_model" and arch.projected and all(arch.role(n) for n in names)
    assert arch.num_layers(config) == 2 and arch.hidden_size(config) == 32 and not arch.tied(config)
    assert arch.unrotatable in arch.rotation_obstacles()
    assert [arch.role(n).role for n in ("model.visual.final_norm.weight", "model.audio.final_norm.weight",
                                        "model.audio.encoder.weight")] == ["write_norm", "write_norm", "stream_vector"]

    model = reloaded("InklingForConditionalGeneration", tmp_path / "a")
    in_memory = dict(model.named_parameters())
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    text = architectures.for_config(config["text_config"])
    assert text.name == "inkling_text"
    mirrored = 0
    for name in names:
        renamed = apply_renamings(name, renamings)
        if renamed in in_memory and modules.part_of(renamed) == modules.TEXT:  # not the fused w13 (converted)
            own, expected = arch.role(name), text.role(renamed.replace("model.language_model.", "model."))
            assert (own.role, own.layer) == (expected.role, expected.layer), name
            assert own.norm is None or apply_renamings(own.norm, renamings).replace(
                "model.language_model.", "model.") == expected.norm, name
            mirrored += 1
    assert mirrored > 30, mirrored

    merged = merged_fine_tunes(a, "InklingForConditionalGeneration", tmp_path)
    ids = inkling_prompt()["input_ids"]
    with torch.no_grad():
        assert merged.generate(**inkling_prompt(), max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
