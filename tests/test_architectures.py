import ast
import itertools
import json
import re
import warnings
from pathlib import Path

import pytest

import seme.architectures as archs
from bench.zoo import rotate  # the residual stream turned by the role table alone
from seme.architectures import for_config, known_architectures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: E402
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming, apply_renamings  # noqa: E402

DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128)
MLA = dict(DECODER, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4,
           v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
GATED_DELTA_NET = dict(DECODER, head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, pad_token_id=0)
# the checkpoints' layer type full_attention, which transformers reads as indexed_attention; tiny n-gram tables
QWEN4_EXP = dict(GATED_DELTA_NET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 shared_expert_intermediate_size=24, hc_count=2, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1,
                 indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2, ple_layer_ids=[1], ple_embed_dim=16,
                 heads_per_ngram=2, ngram_vocab_size_base=64, make_ngram_vocab_size_divisible_by=8,
                 split_ngram_parts=2, bos_token_id=1, eos_token_id=2)
SSM = dict(hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=8)
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
               max_position_embeddings=64)
# DeBERTa-v3's settings: relative positions in buckets, normalised, their keys and queries by the tokens' projections
DEBERTA_V3 = dict(ENCODER, relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
                  pos_att_type="p2c|c2p", position_biased_input=False)
MODERNBERT = dict(ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                  mask_token_id=3, global_attn_every_n_layers=2, local_attention=4)
MODERNBERT_DECODER = dict(ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                          sliding_window=4, layer_types=["sliding_attention", "full_attention"])
REMBERT = dict(ENCODER, input_embedding_size=16, output_embedding_size=24)
ROC_BERT = dict(ENCODER, shape_vocab_size=40, shape_embed_dim=16, pronunciation_vocab_size=30, pronunciation_embed_dim=24)
XMOD = dict(ENCODER, languages=["en_XX", "de_DE"], default_language="en_XX")
EUROBERT = dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3)
CROSS_ATTENTION = dict(ENCODER, is_decoder=True, add_cross_attention=True)  # BERT as a seq2seq decoder
# ESM-2's settings: rotary positions, masked tokens' embeddings zeroed and the rest rescaled, no norm before the layers
ESM = dict(ENCODER, pad_token_id=1, mask_token_id=4, position_embedding_type="rotary", token_dropout=True,
           emb_layer_norm_before=False)
# two layer groups, each run by one of the two layers (released models: one group run by every layer)
ALBERT = dict(ENCODER, embedding_size=16, num_hidden_groups=2)
# windows of 4 tokens, so that 8 tokens need no padding (FORWARD_INPUTS makes every one of them global)
LONGFORMER = dict(ENCODER, attention_window=4)
LAYOUTLM = dict(ENCODER, max_2d_position_embeddings=16)  # box coordinates up to 15
# embeddings of 8 (24 with their neighbours'), layers working in bottlenecks of 16, each with two stacked FFNs
MOBILEBERT = dict(ENCODER, embedding_size=8, intra_bottleneck_size=16, num_feedforward_networks=3)
DISTILBERT = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128, max_position_embeddings=64)
ASSISTANT_TEXT = dict(DECODER, head_dim=8, global_head_dim=16, layer_types=["sliding_attention", "full_attention"])
# image and audio token ids inside the vocabulary; a 28-pixel crop of 2x2 patches, 16 frames of 80 features
PHI4_MULTIMODAL = dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, vision_config=dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
    crop_size=28, image_token_id=120), audio_config=dict(
    hidden_size=16, intermediate_size=32, num_blocks=2, num_attention_heads=2, ext_pw_out_channel=16,
    depthwise_separable_out_channel=16, nemo_conv_channels=16, audio_token_id=121))
# Gemma 4's 26B-A4B layers; its image tokens inside the vocabulary
DIFFUSION_GEMMA = dict(text_config=dict(ASSISTANT_TEXT, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
                       vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64,
                                          pooling_kernel_size=2), boi_token_id=120, eoi_token_id=121, image_token_id=122)
# its image token inside the vocabulary; a VQ-VAE of two resolutions (an attention block in the second) and a mid block
CHAMELEON = dict(DECODER, vocabulary_map={"<image>": 120}, vq_config=dict(
    embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[16],
    resolution=32, latent_channels=8))
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4)
MUSE_TEXT = dict(DECODER, head_dim=8, layer_types=["sliding_attention", "full_attention"], layer_rope_theta=[10000.0, 0],
                 tie_word_embeddings=True)
INKLING = dict(DECODER, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, d_rel=4,
               rel_extent=16, sliding_window_size=8, moe_intermediate_size=16, n_routed_experts=4,
               num_experts_per_tok=2, n_shared_experts=2, layer_types=["hybrid_sliding", "hybrid"],
               mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
INKLING2 = dict(DECODER, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                swa_head_dim=8, d_rel=4, rel_extent=16, sliding_window_size=8, unpadded_vocab_size=128,
                moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                layer_types=["hybrid_sliding", "hybrid"], n_layers_per_attn_res_block=1, log_scaling_n_floor=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(DECODER, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(DECODER, head_dim=8)),
    # four AltUp streams (as released); its per-layer token table covers only the first tokens, as in the E2B / E4B
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", dict(DECODER, head_dim=8, layer_types=[
        "sliding_attention", "full_attention"], hidden_size_per_layer_input=8, vocab_size_per_layer_input=120,
        laurel_rank=4, num_kv_shared_layers=0, activation_sparsity_pattern=[0.95, 0.0])),
    "gemma2:vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(DECODER, head_dim=8)),  # no post norms
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DECODER, head_dim=8)),
    # a sliding and a full attention layer, of their own head widths; per-layer inputs off (see CASES)
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(DECODER, head_dim=8, global_head_dim=16,
                                                             layer_types=["sliding_attention", "full_attention"],
                                                             hidden_size_per_layer_input=0,
                                                             vocab_size_per_layer_input=128)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", DECODER),
    # Phi3's default pad_token_id (32000) is outside the tiny vocabulary.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128)),
    # GPT-2 as a seq2seq decoder: a cross-attention sublayer per block, whose k / v read stand-in encoder states
    "gpt2:cross": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                         add_cross_attention=True)),
    # mixtures of experts: checkpoints hold one tensor per expert, transformers fuses them in memory
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(DECODER, head_dim=8, num_experts=4,
                                                                 num_experts_per_tok=2, moe_intermediate_size=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=16,
                                                                 shared_expert_intermediate_size=24)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2, eos_token_id=2)),
    # a dense MLP below first_k_dense_replace, experts above; multi-head latent attention (one key/value head
    # per query head)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(MLA, n_group=1, topk_group=1)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", MLA),
    "deepseek_v3:glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(MLA, n_group=1, topk_group=1)),
    # DeepSeek-V3 plus the lightning indexer
    "deepseek_v3:deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        MLA, n_group=1, topk_group=1, index_n_heads=4, index_head_dim=8, index_topk=4)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(DECODER, head_dim=8, n_routed_experts=4,
                                                             num_experts_per_tok=2, moe_intermediate_size=16,
                                                             first_k_dense_replace=1)),
    # experts fused in checkpoints too: [E, in, out]
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(DECODER, head_dim=8, num_local_experts=4,
                                                          num_experts_per_tok=2, pad_token_id=0)),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(DECODER, head_dim=8, num_local_experts=4,
                                                                  intermediate_size_mlp=64, interleave_moe_layer_step=2,
                                                                  pad_token_id=0)),
    "mixtral:minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(DECODER, head_dim=8, num_local_experts=4,
                                                                    num_experts_per_tok=2, bos_token_id=1,
                                                                    eos_token_id=2)),
    "llama:ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        DECODER, head_dim=8, moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1)),
    "hunyuan_v1_dense:hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, moe_topk=2, pad_token_id=0)),
    "glm4_moe:dots1": ("Dots1Config", "Dots1ForCausalLM", dict(
        DECODER, head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
        first_k_dense_replace=1)),
    "glm4_moe:exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_layer_types=["dense", "sparse"], pad_token_id=0, eos_token_id=2)),
    # a mixture of attention heads and of MLP experts, fused as [E, out, in]
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_key_value_heads=2, kv_channels=8, num_local_experts=4,
                                                         num_experts_per_tok=2, vocab_size=128)),
    # Mamba-2 mixers beside attention, experts fused as [E, out, in] (granite 4)
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "granitemoe:granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        DECODER, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48)),
    "granitemoe:granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        DECODER, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48, mamba_n_heads=8,
        mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16, layer_types=["linear_attention", "full_attention"],
        pad_token_id=0)),
    # Gated DeltaNet linear attention beside gated attention; (1 + w) norms
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        GATED_DELTA_NET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24)),
    "qwen3_next:qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", GATED_DELTA_NET),
    "qwen3_next:qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        GATED_DELTA_NET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24)),
    # gated short convolutions beside attention
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(DECODER, layer_types=["conv", "full_attention"], pad_token_id=0)),
    # state-space models: Mamba-1 / Mamba-2 mixers alone, or beside attention
    "mamba": ("MambaConfig", "MambaForCausalLM", SSM),
    "mamba:falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", SSM),
    "mamba:mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(SSM, num_heads=8, head_dim=8, n_groups=1, chunk_size=4)),
    # layer 0: a Mamba mixer and experts; layer 1: an attention and a dense MLP
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(DECODER, mamba_d_state=8, attn_layer_period=2, attn_layer_offset=1,
                                                      expert_layer_period=2, expert_layer_offset=0, num_experts=4,
                                                      num_experts_per_tok=2)),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(DECODER, attn_layer_indices=[1], **MAMBA2)),
    # muP multipliers (config scalars, and ssm_multipliers over sections of in_proj's output) away from 1
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(
        DECODER, head_dim=8, mamba_d_ssm=64, **MAMBA2, embedding_multiplier=2.0, lm_head_multiplier=0.5,
        attention_in_multiplier=0.5, attention_out_multiplier=1.3, key_multiplier=0.8, ssm_in_multiplier=1.5,
        ssm_out_multiplier=0.7, mlp_multipliers=[0.9, 1.1], ssm_multipliers=[1.0, 0.5, 2.0, 1.5, 0.8])),
    # one mixer per layer; the second key holds the block kinds the first's two layers cannot (without an
    # attention layer, transformers 5.23 cannot run with a cache)
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        DECODER, head_dim=8, layers_block_type=["linear_attention", "full_attention"], mamba_num_heads=8,
        mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=4)),
    "nemotron_h:mlp_moe": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        DECODER, head_dim=8, layers_block_type=["mlp", "moe"], n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, use_cache=False)),
    # experts in a latent width, projected in and out (the table; configs without moe_latent_size are a variant)
    "nemotron_h:latent_moe": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        DECODER, head_dim=8, layers_block_type=["mlp", "moe"], n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=16, use_cache=False)),
    # a shared attention block (reading the residual stream and the embeddings concatenated) before a Mamba-2 mixer
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(
        DECODER, num_key_value_heads=4, layers_block_type=["linear_attention", "hybrid"], n_mamba_heads=8,
        mamba_d_state=8, chunk_size=4, use_shared_attention_adapter=True, adapter_rank=4)),
    "lfm2:lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
        DECODER, layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, pad_token_id=0)),
    # parallel attention and experts from one norm, RMSNorms where rms_norm_eps is set (else LayerNorms: CASES)
    "cohere:cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
        prefix_dense_intermediate_size=48, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # LayerNorm families (rotation does not commute with their norms)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", DECODER),
    "mixtral:phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2,
                                                                  attention_bias=True, lm_head_bias=True)),
    # experts fused as 2-D [E * F, d]: w1 / v1 (out, in), w2 (in, out)
    # (transformers 5.23 reads attn_config.rope_theta, which DbrxAttentionConfig does not declare, and cannot clamp
    # with clip_qkv None)
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", dict(
        d_model=32, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"hidden_size": 32, "ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2})),
    # post-norm: each sublayer carries its norm's output on as the residual; lightning attention beside softmax
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(
        DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"])),
    "falcon": ("FalconConfig", "FalconForCausalLM", DECODER),
    "phi": ("PhiConfig", "PhiForCausalLM", DECODER),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", DECODER),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", DECODER),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "cohere:cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(DECODER, pad_token_id=0, bos_token_id=1,
                                                                   eos_token_id=2)),
    # normalised after each sublayer: the projections read the raw residual stream
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(DECODER, pad_token_id=0)),
    "olmo2:olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(DECODER, pad_token_id=0)),
    "olmo2:exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(DECODER, head_dim=8, pad_token_id=0)),
    "olmo2:flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2,
                                                                      pad_token_id=0, eos_token_id=2)),
    # sandwich norms around the attention and the experts
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16,
        num_dense_layers=1)),
    # llama's tensors under other names
    "llama:ministral": ("MinistralConfig", "MinistralForCausalLM", dict(DECODER, head_dim=8)),
    "llama:ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(DECODER, head_dim=8)),
    "llama:helium": ("HeliumConfig", "HeliumForCausalLM", dict(DECODER, head_dim=8)),
    "llama:seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(DECODER, head_dim=8)),
    "llama:smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(DECODER, pad_token_id=0)),
    "llama:ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(DECODER, head_dim=8)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", DECODER),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(DECODER, head_dim=8, pad_token_id=0)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(DECODER, head_dim=8, pad_token_id=0)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(DECODER, head_dim=8, pad_token_id=0)),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", dict(DECODER, head_dim=8, pad_token_id=0)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(DECODER, head_dim=8, pad_token_id=0, bos_token_id=1,
                                                                  eos_token_id=2)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                                      n_positions=64)),
    # batch A: frontier MoE and attention variants
    # hyper-connections over two streams; a compressed sparse (indexer) and a heavily compressed attention layer, the
    # first hash-routed
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
        q_lora_rank=16, vocab_size=128, n_routed_experts=4, num_experts_per_tok=2, hc_mult=2, o_groups=2,
        o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"], mlp_layer_types=["hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4})),
    # DeepSeek-V3.2's layout; the second layer reuses the first's indexer choice
    "deepseek_v3:glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        MLA, n_group=1, topk_group=1, index_n_heads=4, index_head_dim=8, index_topk=4, indexer_types=["full", "shared"])),
    # Kimi Delta Attention beside latent attention; a dense MLP, then experts
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
        MLA, q_lora_rank=None, num_experts=4, num_experts_per_token=2, linear_head_dim=8, linear_num_heads=4,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    # a sliding-window layer with attention sinks and a dense MLP, then a full attention layer with experts
    "glm4_moe:mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(
        DECODER, head_dim=8, v_head_dim=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"], sliding_window=4,
        pad_token_id=0)),
    # two attention and two MLP sublayers per layer, and a shortcut mixture of experts with identity experts
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM", dict(
        hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=128, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4, head_dim=4, v_head_dim=8, n_routed_experts=4,
        zero_expert_num=2,
        moe_topk=2, expert_ffn_hidden_size=16, pad_token_id=0)),
    # a dense MLP, then experts beside a shared expert (named as Hy3 names them)
    "glm4_moe:hy_v3": ("HYV3Config", "HYV3ForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_layer_types=["dense", "sparse"], pad_token_id=0)),
    # hyper-connections over two streams; GLM-5's attention, gated; the second layer reuses the first's indexer choice
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4,
        qk_rope_head_dim=4, v_head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2,
        indexer_types=["full", "shared"], hc_mult=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # a sliding-window layer with a dense MLP, then a full attention layer with experts; gated heads
    # hyper-connections over two streams; a Gated DeltaNet layer with per-layer n-gram embeddings (two checkpoint
    # shards), then an indexed attention layer; experts beside a shared expert
    "qwen4_exp_text": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", QWEN4_EXP),
    "glm4_moe:laguna": ("LagunaConfig", "LagunaForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, mlp_layer_types=["dense", "sparse"],
        layer_types=["sliding_attention", "full_attention"], sliding_window=4, pad_token_id=0)),
    # batch B: dense and hybrid families
    # non-parametric LayerNorms: checkpoints store no norm
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(DECODER, pad_token_id=0)),
    # pre-norm Gated DeltaNet layers beside post-norm attention layers: a norm's role follows its layer's kind
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", dict(
        GATED_DELTA_NET, layer_types=["linear_attention", "full_attention"])),
    # without its sandwich norms (see CASES), so that the turn checks the attention's gate
    "lfm2:lfm3": ("Lfm3Config", "Lfm3ForCausalLM", dict(DECODER, head_dim=8, layer_types=["conv", "sliding_attention"],
                                                       use_sandwich_norm=False, pad_token_id=0, bos_token_id=1,
                                                       eos_token_id=2)),
    # llama's model for configs of their own
    "llama:internlm3": ("InternLM3Config", "LlamaForCausalLM", dict(DECODER, head_dim=8)),
    "llama:iquestcoder": ("IQuestCoderConfig", "LlamaForCausalLM", dict(DECODER, head_dim=8)),
    "llama:cwm": ("CwmConfig", "CwmForCausalLM", dict(DECODER, head_dim=8, layer_types=["sliding_attention",
                                                                                      "full_attention"])),
    # DeepSeek-V2's latent attention, a dense MLP in every layer, muP-like scalars away from 1
    "deepseek_v2:minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(
        MLA, scale_emb=3.0, scale_depth=2.0, dim_model_base=8)),
    "deepseek_v2:youtu": ("YoutuConfig", "YoutuForCausalLM", MLA),
    # convolutional attention, one expert per token, and a residual stream scaled channel by channel
    "zaya": ("ZayaConfig", "ZayaForCausalLM", dict(DECODER, head_dim=8, num_experts=4, num_experts_per_tok=1,
                                                   moe_intermediate_size=16, router_hidden_size=16)),
    # LayerNorms, an MLP without a gate
    "jais2": ("Jais2Config", "Jais2ForCausalLM", dict(DECODER, head_dim=8)),
    # RMSNorms without gains (the embeddings normalised too), q/k normalised per head, logits soft-capped
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", dict(DECODER, head_dim=8, final_logit_softcapping=3.0)),
    # a dense layer, then a sparse one (mlp_layer_types)
    "qwen3_moe:mellum": ("MellumConfig", "MellumForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_layer_types=["dense", "sparse"])),
    "glm4_moe:solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(
        DECODER, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    # batch C: other decoder families
    # a sliding-window layer without RoPE beside a full one; a sink logit per head
    "granite:granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", dict(
        DECODER, layer_types=["full_attention", "sliding_attention"], sliding_window=4, layer_rope_theta=[10000.0, 0])),
    "granitemoe:granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(
        DECODER, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
        layer_types=["full_attention", "sliding_attention"], sliding_window=4)),
    # norms over the attention's and the MLP's inner outputs, before o_proj / down_proj
    "llama:bitnet": ("BitNetConfig", "BitNetForCausalLM", DECODER),
    # each sublayer's output normalised before the residual add (use_post_norm; without: CASES)
    "granite:hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", DECODER),
    # layer 0: a Kimi delta attention and a dense MLP; layer 1: a latent attention and experts (Ling 3.0)
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
        DECODER, num_key_value_heads=4, head_dim=8, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4,
        v_head_dim=8, num_experts=4, num_experts_per_token=2, moe_intermediate_size=16, first_k_dense_replace=1,
        num_expert_group=1, topk_group=1, layer_types=["linear_attention", "full_attention"], pad_token_id=0,
        eos_token_id=2)),
    # a sink logit per head, RoPE only in sliding-window layers; a dense MLP in layer 0, experts and an ungated
    # shared expert in layer 1
    "qwen3_moe:flint": ("FlintConfig", "FlintForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, mlp_only_layers=[0], layer_types=["sliding_attention", "full_attention"],
        sliding_window=4)),
    # sandwich norms around the attention and the experts
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
    # residual connections scaled per channel; dynamic mask attention over more tokens than keep_window_size
    "doge": ("DogeConfig", "DogeForCausalLM", dict(DECODER, keep_window_size=4)),
    # differential attention: two softmaxes per head, weighted by learnt vectors
    "llama:diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", DECODER),
    # DeepSeek-V3 with the experts' output normalised before the add
    "deepseek_v3:axk1": ("AXK1Config", "AXK1ForCausalLM", dict(MLA, n_group=1, topk_group=1,
                                                            mlp_layer_types=["dense", "sparse"])),
    # DeepSeek-V3.2 with gated norms: a low-rank gate from the normalised stream multiplies it per channel
    "axk2": ("AXK2Config", "AXK2ForCausalLM", dict(
        MLA, index_n_heads=4, index_head_dim=8, index_topk=4, gated_norm_rank=4, mlp_layer_types=["dense", "sparse"])),
    # an indexed attention with a dense MLP, then a sliding-window one (its own widths) with experts; gated heads
    "deepseek_v3:dots3_note_text": ("Dots3NoteTextConfig", "Dots3NoteForCausalLM", dict(
        MLA, head_dim=8, shared_experts_intermediate_size=16, index_n_heads=4, index_head_dim=8, index_topk=4,
        layer_types=["indexed_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"], sliding_window=4,
        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16, swa_head_dim=8,
        swa_qk_nope_head_dim=4, swa_v_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # experts fused in checkpoints as [E, in, out] (fc1, fc2), beside shared experts
    "aria_text": ("AriaTextConfig", "AriaTextForCausalLM", dict(DECODER, intermediate_size=16, moe_num_experts=4, moe_topk=2,
                                                                moe_num_shared_experts=1, pad_token_id=0)),
    # Cohere2's tensors; a sliding-window layer beside a full one without rotary embeddings
    "cohere:cohere_compass_text": ("CohereCompassTextConfig", "CohereCompassForCausalLM", dict(
        DECODER, layer_types=["sliding_attention", "full_attention"], sliding_window=4, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": None},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # (1 + w) norms; a sparse-indexed attention and a dense MLP, then a full attention and experts
    "minimax_m3_vl_text": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", dict(
        DECODER, intermediate_size=16, dense_intermediate_size=64, shared_intermediate_size=24, head_dim=8, rotary_dim=4,
        num_local_experts=4, num_experts_per_tok=2, index_n_heads=2, index_head_dim=8, index_block_size=2,
        index_topk_blocks=2, layer_types=["minimax_m3_sparse", "full_attention"], mlp_layer_types=["dense", "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # batch F: classic decoder families (LayerNorms, learned positions, fused or parallel sublayers)
    "opt": ("OPTConfig", "OPTForCausalLM", dict(DECODER, ffn_dim=64, max_position_embeddings=64, pad_token_id=0)),
    # the embeddings normalised before the first layer; ALiBi
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128)),
    # parallel attention and MLP from one norm, a head with a bias
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                                                  vocab_size=128)),
    # a global and a local attention layer
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=128,
                                                         max_position_embeddings=64, intermediate_size=64,
                                                         attention_types=[[["global", "local"], 1]], window_size=4,
                                                         bos_token_id=1, eos_token_id=2)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=32, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=64)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                           n_positions=64, vocab_size=128, bos_token_id=1,
                                                           eos_token_id=2)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(DECODER, pad_token_id=0, bos_token_id=1,
                                                                 eos_token_id=2)),
    # pre-norm BART decoders: sinusoidal (xglm) or learned (biogpt) positions, the embeddings scaled
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                                                   vocab_size=128, max_position_embeddings=64)),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(DECODER, max_position_embeddings=64, pad_token_id=0,
                                                         bos_token_id=1, eos_token_id=2)),
    # a bias vector after the last layer's attention only
    "gpt_neox_japanese": ("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", dict(
        DECODER, intermediate_multiple_size=2, bos_token_id=1, eos_token_id=2)),
    # post-norm: each norm's output is the residual
    "openai-gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                                   n_positions=64)),
    "ctrl": ("CTRLConfig", "CTRLLMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, dff=64, vocab_size=128,
                                                   n_positions=64)),
    # an RG-LRU recurrence, then a local attention; (1 + w) RMSNorms
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(
        DECODER, block_types=["recurrent", "attention"], attention_window_size=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    # two hybrid layers: the shared attention (reading the stream and the embeddings concatenated) before a Mamba-1
    # mixer (transformers 5.23 cannot tie the shared block where a single layer uses it)
    "zamba": ("ZambaConfig", "ZambaForCausalLM", dict(
        DECODER, num_key_value_heads=4, n_mamba_heads=2, mamba_d_state=8, layers_block_type=["hybrid", "hybrid"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # mLSTM blocks: a matrix-memory recurrence with exponential gates, then a gated MLP
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=128,
                                                      use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # batch D: language models inside multimodal wrappers
    # DeepSeek-V3's tensors, the experts fused (Mistral Small 4)
    "deepseek_v3:mistral4": ("Mistral4Config", "Mistral4ForCausalLM", dict(MLA, n_group=1, topk_group=1)),
    # encoders
    # post-LN; a masked-LM head tied to the word embeddings, or a pooler and classifiers, or heads on every token
    "bert": ("BertConfig", "BertForMaskedLM", ENCODER),
    "bert:pretraining": ("BertConfig", "BertForPreTraining", ENCODER),  # the pooler, the MLM head and the NSP head
    "bert:seqcls": ("BertConfig", "BertForSequenceClassification", ENCODER),
    "bert:tokcls": ("BertConfig", "BertForTokenClassification", ENCODER),
    "bert:qa": ("BertConfig", "BertForQuestionAnswering", ENCODER),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", ENCODER),
    "roberta:seqcls": ("RobertaConfig", "RobertaForSequenceClassification", ENCODER),
    "roberta:tokcls": ("RobertaConfig", "RobertaForTokenClassification", ENCODER),
    "roberta:xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", ENCODER),
    "roberta:camembert": ("CamembertConfig", "CamembertForSequenceClassification", ENCODER),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", DISTILBERT),
    "distilbert:seqcls": ("DistilBertConfig", "DistilBertForSequenceClassification", DISTILBERT),
    "distilbert:tokcls": ("DistilBertConfig", "DistilBertForTokenClassification", DISTILBERT),
    "ernie": ("ErnieConfig", "ErnieForPreTraining", ENCODER),  # BERT's under ernie.
    # encoders 2
    # post-LN with disentangled attention over a table of relative positions
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", DEBERTA_V3),
    "deberta_v2:seqcls": ("DebertaV2Config", "DebertaV2ForSequenceClassification", DEBERTA_V3),
    "deberta_v2:tokcls": ("DebertaV2Config", "DebertaV2ForTokenClassification", DEBERTA_V3),
    "deberta_v2:qa": ("DebertaV2Config", "DebertaV2ForQuestionAnswering", DEBERTA_V3),
    # query, key and value fused
    "deberta": ("DebertaConfig", "DebertaForMaskedLM", dict(ENCODER, relative_attention=True, pos_att_type="c2p|p2c",
                                                           position_biased_input=False)),
    "deberta:seqcls": ("DebertaConfig", "DebertaForSequenceClassification", dict(ENCODER, type_vocab_size=2)),
    # pre-LN, the first layer without an attention norm; a global and a local attention layer
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", MODERNBERT),
    "modernbert:seqcls": ("ModernBertConfig", "ModernBertForSequenceClassification", MODERNBERT),
    "modernbert:tokcls": ("ModernBertConfig", "ModernBertForTokenClassification", MODERNBERT),
    # BERT's layers; a discriminator, a generator whose embeddings are narrower than the stream (projected into it)
    "electra": ("ElectraConfig", "ElectraForPreTraining", dict(ENCODER, embedding_size=32)),
    "electra:mlm": ("ElectraConfig", "ElectraForMaskedLM", dict(ENCODER, embedding_size=16)),
    "electra:seqcls": ("ElectraConfig", "ElectraForSequenceClassification", dict(ENCODER, embedding_size=32)),
    "electra:tokcls": ("ElectraConfig", "ElectraForTokenClassification", dict(ENCODER, embedding_size=16)),
    # pre-LN RoBERTa: a norm before the first layer (or none: XLM-RoBERTa-XL), one after the last for the heads
    "roberta_prelayernorm": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormForMaskedLM", ENCODER),
    "roberta_prelayernorm:seqcls": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormForSequenceClassification", ENCODER),
    "roberta_prelayernorm:tokcls": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormForTokenClassification", ENCODER),
    "xlm_roberta_xl": ("XLMRobertaXLConfig", "XLMRobertaXLForMaskedLM", ENCODER),
    "xlm_roberta_xl:seqcls": ("XLMRobertaXLConfig", "XLMRobertaXLForSequenceClassification", ENCODER),
    "xlm_roberta_xl:qa": ("XLMRobertaXLConfig", "XLMRobertaXLForQuestionAnswering", ENCODER),
    # encoders 3
    # RoBERTa's layers under data2vec_text.; X-MOD's with an adapter per language (named by the config)
    "data2vec_text": ("Data2VecTextConfig", "Data2VecTextForMaskedLM", ENCODER),
    "data2vec_text:seqcls": ("Data2VecTextConfig", "Data2VecTextForSequenceClassification", ENCODER),
    "data2vec_text:tokcls": ("Data2VecTextConfig", "Data2VecTextForTokenClassification", ENCODER),
    "xmod": ("XmodConfig", "XmodForMaskedLM", XMOD),
    "xmod:seqcls": ("XmodConfig", "XmodForSequenceClassification", XMOD),
    # pre-LN BERT, a norm after the last layer for the heads
    "megatron_bert": ("MegatronBertConfig", "MegatronBertForPreTraining", ENCODER),
    "megatron_bert:tokcls": ("MegatronBertConfig", "MegatronBertForTokenClassification", ENCODER),
    "megatron_bert:qa": ("MegatronBertConfig", "MegatronBertForQuestionAnswering", ENCODER),
    # BERT without token types or pooler; a decoder whose cross-attention reads stand-in encoder states
    "bert_generation": ("BertGenerationConfig", "BertGenerationDecoder", ENCODER),
    "bert_generation:encoder": ("BertGenerationConfig", "BertGenerationEncoder", ENCODER),
    "bert_generation:cross": ("BertGenerationConfig", "BertGenerationDecoder", CROSS_ATTENTION),
    "bert:cross": ("BertConfig", "BertLMHeadModel", CROSS_ATTENTION),
    # BERT's tensors, block-sparse attention; a question-answering head with an MLP sublayer of its own
    "big_bird": ("BigBirdConfig", "BigBirdForPreTraining", ENCODER),
    "big_bird:seqcls": ("BigBirdConfig", "BigBirdForSequenceClassification", ENCODER),
    "big_bird:qa": ("BigBirdConfig", "BigBirdForQuestionAnswering", ENCODER),
    # input and output embeddings narrower than the stream, each a table of its own
    "rembert": ("RemBertConfig", "RemBertForMaskedLM", REMBERT),
    "rembert:seqcls": ("RemBertConfig", "RemBertForSequenceClassification", REMBERT),
    "rembert:tokcls": ("RemBertConfig", "RemBertForTokenClassification", REMBERT),
    # ModernBERT's layers, causal (Ettin's decoders)
    "modernbert_decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM", MODERNBERT_DECODER),
    "modernbert_decoder:seqcls": ("ModernBertDecoderConfig", "ModernBertDecoderForSequenceClassification",
                                  MODERNBERT_DECODER),
    # word, glyph shape and pronunciation embeddings concatenated and projected into the stream
    "roc_bert": ("RoCBertConfig", "RoCBertForMaskedLM", ROC_BERT),
    "roc_bert:seqcls": ("RoCBertConfig", "RoCBertForSequenceClassification", ROC_BERT),
    "roc_bert:tokcls": ("RoCBertConfig", "RoCBertForTokenClassification", ROC_BERT),
    "roc_bert:qa": ("RoCBertConfig", "RoCBertForQuestionAnswering", ROC_BERT),
    # rotary positions; embeddings narrower than the stream (projected into it) or as wide
    "roformer": ("RoFormerConfig", "RoFormerForMaskedLM", dict(ENCODER, embedding_size=16)),
    "roformer:seqcls": ("RoFormerConfig", "RoFormerForSequenceClassification", dict(ENCODER, embedding_size=32)),
    # esm, albert
    # pre-LN protein language models (ESM-2: rotary); a contact head over every layer's attention maps
    "esm": ("EsmConfig", "EsmForMaskedLM", ESM),
    "esm:seqcls": ("EsmConfig", "EsmForSequenceClassification", ESM),
    "esm:tokcls": ("EsmConfig", "EsmForTokenClassification", ESM),
    "esm:model": ("EsmConfig", "EsmModel", ESM),  # the pooler
    # BERT's post-LN layers in groups shared across depth; embeddings narrower than the stream, projected into it
    "albert": ("AlbertConfig", "AlbertForPreTraining", ALBERT),  # the pooler, the MLM head and the sentence-order head
    "albert:mlm": ("AlbertConfig", "AlbertForMaskedLM", ALBERT),
    "albert:seqcls": ("AlbertConfig", "AlbertForSequenceClassification", ALBERT),
    "albert:tokcls": ("AlbertConfig", "AlbertForTokenClassification", ALBERT),
    "albert:qa": ("AlbertConfig", "AlbertForQuestionAnswering", ALBERT),
    # text-embedding encoders: embedding checkpoints are the base model saved alone (no head, no prefix)
    # BERT's post-LN layers renamed, a relative-position bias table shared by the layers
    "mpnet": ("MPNetConfig", "MPNetForMaskedLM", ENCODER),
    "mpnet:model": ("MPNetConfig", "MPNetModel", ENCODER),  # all-mpnet-base-v2: the pooler, no prefix
    "mpnet:seqcls": ("MPNetConfig", "MPNetForSequenceClassification", ENCODER),
    "mpnet:tokcls": ("MPNetConfig", "MPNetForTokenClassification", ENCODER),
    "mpnet:qa": ("MPNetConfig", "MPNetForQuestionAnswering", ENCODER),
    # post-LN, rotary; query, key and value fused in checkpoints (gte: the MLP's up and gate too), split in memory
    "nomic_bert": ("NomicBertConfig", "NomicBertForMaskedLM", ENCODER),
    "nomic_bert:model": ("NomicBertConfig", "NomicBertModel", ENCODER),
    "nomic_bert:seqcls": ("NomicBertConfig", "NomicBertForSequenceClassification", ENCODER),
    "nomic_bert:tokcls": ("NomicBertConfig", "NomicBertForTokenClassification", ENCODER),
    "gte": ("GteConfig", "GteForMaskedLM", ENCODER),
    "gte:model": ("GteConfig", "GteModel", ENCODER),
    "gte:seqcls": ("GteConfig", "GteForSequenceClassification", ENCODER),
    "gte:tokcls": ("GteConfig", "GteForTokenClassification", ENCODER),
    # Llama's pre-RMSNorm layers, bidirectional; heads on the final norm's output (the classifiers' configs tied, so
    # that a checkpoint without a head lacks none)
    "eurobert": ("EuroBertConfig", "EuroBertForMaskedLM", EUROBERT),
    "eurobert:seqcls": ("EuroBertConfig", "EuroBertForSequenceClassification", dict(EUROBERT, tie_word_embeddings=True)),
    "eurobert:tokcls": ("EuroBertConfig", "EuroBertForTokenClassification", dict(EUROBERT, tie_word_embeddings=True)),
    # classic encoders
    # RoBERTa's post-LN layers with sliding-window attention; global tokens' own query, key and value
    "longformer": ("LongformerConfig", "LongformerForMaskedLM", LONGFORMER),
    "longformer:model": ("LongformerConfig", "LongformerModel", LONGFORMER),  # the pooler
    "longformer:seqcls": ("LongformerConfig", "LongformerForSequenceClassification", LONGFORMER),
    "longformer:tokcls": ("LongformerConfig", "LongformerForTokenClassification", LONGFORMER),
    "longformer:qa": ("LongformerConfig", "LongformerForQuestionAnswering", LONGFORMER),
    # BERT's layers; each token's box adds rows of 2-D position tables (every head class keeps the pooler)
    "layoutlm": ("LayoutLMConfig", "LayoutLMForMaskedLM", LAYOUTLM),
    "layoutlm:seqcls": ("LayoutLMConfig", "LayoutLMForSequenceClassification", LAYOUTLM),
    "layoutlm:tokcls": ("LayoutLMConfig", "LayoutLMForTokenClassification", LAYOUTLM),
    "layoutlm:qa": ("LayoutLMConfig", "LayoutLMForQuestionAnswering", LAYOUTLM),
    # BERT's post-LN layout, a Fourier transform in place of attention; embeddings projected into the stream
    "fnet": ("FNetConfig", "FNetForPreTraining", ENCODER),  # the pooler, the MLM head and the next-sentence head
    "fnet:mlm": ("FNetConfig", "FNetForMaskedLM", ENCODER),
    "fnet:seqcls": ("FNetConfig", "FNetForSequenceClassification", ENCODER),
    "fnet:tokcls": ("FNetConfig", "FNetForTokenClassification", ENCODER),
    "fnet:qa": ("FNetConfig", "FNetForQuestionAnswering", ENCODER),
    # ELECTRA's layers, half the attention a dynamic convolution; embeddings narrower than the stream or as wide
    "convbert": ("ConvBertConfig", "ConvBertForMaskedLM", dict(ENCODER, embedding_size=16)),
    "convbert:seqcls": ("ConvBertConfig", "ConvBertForSequenceClassification", dict(ENCODER, embedding_size=32)),
    "convbert:tokcls": ("ConvBertConfig", "ConvBertForTokenClassification", dict(ENCODER, embedding_size=16)),
    "convbert:qa": ("ConvBertConfig", "ConvBertForQuestionAnswering", dict(ENCODER, embedding_size=32)),
    # bottlenecked layers around a stream scaled per channel (NoNorm); the MLM head's columns past the embeddings' width
    "mobilebert": ("MobileBertConfig", "MobileBertForPreTraining", MOBILEBERT),  # the pooler, MLM and NSP heads
    "mobilebert:mlm": ("MobileBertConfig", "MobileBertForMaskedLM", MOBILEBERT),
    "mobilebert:seqcls": ("MobileBertConfig", "MobileBertForSequenceClassification", MOBILEBERT),
    "mobilebert:tokcls": ("MobileBertConfig", "MobileBertForTokenClassification", MOBILEBERT),
    "mobilebert:qa": ("MobileBertConfig", "MobileBertForQuestionAnswering", MOBILEBERT),
    # mllama, emu3, phi-4-multimodal
    # a self-attention layer, then a cross-attention layer (cross_attention_layers lists its index)
    "mllama": ("MllamaTextConfig", "MllamaForCausalLM", dict(DECODER, cross_attention_layers=[1], pad_token_id=0,
                                                             bos_token_id=1, eos_token_id=2)),
    "llama:emu3_text_model": ("Emu3TextConfig", "Emu3ForCausalLM", dict(DECODER, pad_token_id=0, bos_token_id=1,
                                                                        eos_token_id=2)),
    # gemma 4 unified
    # Gemma 4's names and norms in Gemma 2's decoder layer: a sliding and a full attention layer, no per-layer inputs
    "gemma4:gemma4_unified_text": ("Gemma4UnifiedTextConfig", "Gemma4UnifiedForCausalLM", dict(
        DECODER, head_dim=8, global_head_dim=16, layer_types=["sliding_attention", "full_attention"])),
    # drafters beside a target of 48 channels: every layer attends to the target's keys and values
    "gemma4_assistant": ("Gemma4AssistantConfig", "Gemma4AssistantForCausalLM", dict(
        text_config=dict(ASSISTANT_TEXT, model_type="gemma4_text", hidden_size_per_layer_input=0,
                         vocab_size_per_layer_input=0), backbone_hidden_size=48)),
    "gemma4_assistant:gemma4_unified_assistant": ("Gemma4UnifiedAssistantConfig", "Gemma4UnifiedAssistantForCausalLM", dict(
        text_config=dict(ASSISTANT_TEXT, model_type="gemma4_unified_text"), backbone_hidden_size=48)),
    # beam, cpm-ant, git
    # sandwich norms; a dense MLP, then experts routed in groups; gated heads; a sliding and a full (NoPE) layer
    "beam": ("BeamConfig", "BeamForCausalLM", dict(
        DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
        mlp_layer_types=["dense", "sparse"], layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
    # a head never tied: the embedding holds prompt rows (3 types of 2) after the vocabulary's; segment embeddings
    "cpmant": ("CpmAntConfig", "CpmAntForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, dim_head=8, dim_ff=64, vocab_size=128,
        prompt_types=3, prompt_length=2, segment_types=3, position_bias_num_buckets=8, position_bias_max_distance=16,
        tie_word_embeddings=False)),
    # phi-4-multimodal
    # Phi-3's decoder beside a SigLIP image embedder and a conformer audio embedder, whose down projections write
    # into the stream: with an image and a sound (the sound through down_proj_for_vision_speech), or a sound alone
    "phi4_multimodal": ("Phi4MultimodalConfig", "Phi4MultimodalForCausalLM", PHI4_MULTIMODAL),
    "phi4_multimodal:speech": ("Phi4MultimodalConfig", "Phi4MultimodalForCausalLM", PHI4_MULTIMODAL),
    "diffusion_gemma": ("DiffusionGemmaConfig", "DiffusionGemmaForBlockDiffusion", DIFFUSION_GEMMA),
    # chameleon
    # per-head q/k LayerNorms; a VQ-VAE image tokenizer beside the decoder; swin_norm: norms after the sublayers
    "chameleon": ("ChameleonConfig", "ChameleonForConditionalGeneration", CHAMELEON),
    "chameleon:swin": ("ChameleonConfig", "ChameleonForConditionalGeneration", dict(CHAMELEON, swin_norm=True)),
    # muse
    # Muse's language models, which transformers has no causal LM of: the bare text model (no head; tied, so that the
    # checkpoint lacks none); a sliding-window layer with RoPE, then a full-attention layer without; Spark's first
    # layer's MLP dense, its second's a mixture of experts
    "muse_glimmer_text": ("MuseGlimmerTextConfig", "MuseGlimmerTextModel", MUSE_TEXT),
    "muse_spark_text": ("MuseSparkTextConfig", "MuseSparkTextModel", dict(
        MUSE_TEXT, num_local_experts=4, num_experts_per_tok=2, moe_hidden_size=16, moe_intermediate_size=16,
        mlp_layer_types=["dense", "sparse"])),
    # inkling
    # a sliding and a full attention layer (their relative-bias banks differ in width), a dense MLP and a mixture of
    # experts whose router also scores the shared experts
    "inkling_text": ("InklingTextConfig", "InklingForCausalLM", INKLING),
    # a sliding and a full attention layer (its attention input three queries, its keys' and values' convolutions
    # dynamic), each closing an attention-residual block; saved in the checkpoints' own layout
    "inkling2_text": ("Inkling2TextConfig", "Inkling2ForCausalLM", INKLING2),
    # with its image and audio towers, saved in the checkpoints' own layout (model.llm., fused w13)
    "inkling_mm_model": ("InklingConfig", "InklingForConditionalGeneration", dict(
        text_config=INKLING, vision_config=dict(hidden_size=16, num_hidden_layers=3, patch_size=4, temporal_patch_size=2),
        audio_config=dict(n_mel_bins=4, mel_vocab_size=8), image_token_id=100, audio_token_id=101,
        image_bos_token_id=102, audio_bos_token_id=103)),
}
PHI4_IMAGE = lambda: dict(image_pixel_values=torch.randn(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(4)),
                          image_sizes=torch.tensor([[28, 28]]), image_attention_mask=torch.ones(1, 2, 2, 2))
PHI4_SOUND = lambda: dict(audio_input_features=torch.randn(1, 16, 80, generator=torch.Generator().manual_seed(5)),
                          audio_embed_sizes=torch.tensor([1]))
# What a family's model takes beside the token ids for every layer to run (Mllama's cross-attention layers run only
# on image features: stand-ins of the stream's width, which its cross_attn.k_proj / v_proj read), and its own token
# ids (input_ids) where the stand-ins fill places among them
FORWARD_INPUTS = {
    "mllama": lambda: dict(cross_attention_states=torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(4))),
    # Gemma 4's drafters (which take no token ids): the target's embedding and last hidden state of the token drafted
    # from, and its last sliding and full attention layers' keys and values (2 heads of 8 and 16 channels) over 8 tokens
    "gemma4_assistant": lambda: dict(
        inputs_embeds=torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(4)),
        shared_kv_states={kind: (torch.randn(1, 2, 8, width), torch.randn(1, 2, 8, width))
                          for kind, width in (("sliding_attention", 8), ("full_attention", 16))}),
    # BERT's cross-attention reads an encoder's output (its key and value)
    "bert:cross": lambda: dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(4))),
    "bert_generation:cross": lambda: dict(encoder_hidden_states=torch.randn(1, 5, 32,
                                                                            generator=torch.Generator().manual_seed(4))),
    "gpt2:cross": lambda: dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(4))),
    # Phi-4-multimodal's token ids (input_ids) with the places its stand-ins fill: an image (a global view and one
    # crop, 5 image tokens) and a sound (1 audio token), or the sound alone
    "phi4_multimodal": lambda: dict(input_ids=torch.tensor([[3, 4, 120, 120, 120, 120, 120, 5, 121, 6]]),
                                    **PHI4_IMAGE(), **PHI4_SOUND()),
    "phi4_multimodal:speech": lambda: dict(input_ids=torch.tensor([[3, 4, 5, 121, 6, 7, 8, 9]]), **PHI4_SOUND()),
    # Longformer's global attention on every token: query_global reads the global tokens' states, here the whole stream
    "longformer": lambda: dict(global_attention_mask=torch.ones(1, 8, dtype=torch.long)),
    # DiffusionGemma's canvas of 3 tokens, refined over the prompt's cache, and the previous step's logits, whose soft
    # embeddings its self-conditioning reads
    "diffusion_gemma": lambda: dict(decoder_input_ids=torch.tensor([[7, 8, 9]]), self_conditioning_logits=torch.randn(
        1, 3, 128, generator=torch.Generator().manual_seed(4))),
}
# Rows of the embedding beyond the head's (Mllama's 8: its image token is id vocab_size)
EXTRA_EMBEDDING_ROWS = {"mllama": 8, "cpmant": 6}  # CPM-Ant's: its prompt rows


def forward_inputs(key):
    """What a FAMILIES key's model takes beside the token ids: its own entry's, else its table's."""
    return FORWARD_INPUTS.get(key, FORWARD_INPUTS.get(family_of(key), dict))()


# Checkpoints name these tensors unlike transformers in memory (one tensor per expert, granite's input_linear,
# nemotron_h's backbone; DiffusionGemma's encoder holds tied copies of its decoder's weights, which checkpoints keep once).
MOE = {"mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe", "granitemoe",
       "granitemoe:granitemoeshared", "granitemoe:granitemoehybrid", "deepseek_v3:glm4_moe_lite",
       "deepseek_v3:deepseek_v32", "jamba", "nemotron_h", "nemotron_h:mlp_moe", "nemotron_h:latent_moe",
       "mixtral:phimoe", "mixtral:minimax_m2", "minimax", "llama:ernie4_5_moe", "hunyuan_v1_dense:hunyuan_v1_moe",
       "glm4_moe:dots1", "glm4_moe:exaone_moe", "olmo2:flex_olmo", "lfm2:lfm2_moe", "cohere:cohere2_moe", "afmoe",
       "olmo_hybrid", "lfm2:lfm3", "glm4_moe:solar_open", "qwen3_moe:mellum",
       "deepseek_v4", "deepseek_v3:glm_moe_dsa", "kimi_linear", "glm4_moe:mimo_v2_flash", "longcat_flash",
       "glm4_moe:hy_v3", "hy_v4", "glm4_moe:laguna", "qwen4_exp_text",
       "bailing_hybrid", "qwen3_moe:flint", "kolibri1", "deepseek_v3:axk1", "axk2",
       "deepseek_v3:dots3_note_text", "aria_text", "inkling_mm_model", "inkling2_text",
       # beam, cpm-ant, git
       "beam", "diffusion_gemma",
       # text-embedding encoders: fused projections and other names in checkpoints
       "nomic_bert", "nomic_bert:model", "nomic_bert:seqcls", "nomic_bert:tokcls", "gte", "gte:model", "gte:seqcls",
       "gte:tokcls"}
CASES = [(f, {}) for f in FAMILIES] + [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("gemma", {"tie_word_embeddings": False}),
    ("gpt_neox", {"use_parallel_residual": False}),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # falcon-40b / 180b: ln_attn, ln_mlp
    ("falcon", {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 1}),  # falcon2-11b
    ("falcon", {"parallel_attn": False, "bias": True}),  # falcon-rw
    ("phi", {"qk_layernorm": True}),
    ("stablelm", {"use_parallel_residual": True, "use_qkv_bias": True, "qk_layernorm": True}),
    ("starcoder2", {"use_bias": False}),
    ("cohere", {"use_qk_norm": True, "attention_bias": True}),
    ("llama:seed_oss", {"attention_bias": True}),
    ("llama:ernie4_5", {"use_bias": True}),
    ("llama:smollm3", {"tie_word_embeddings": False}),
    ("hunyuan_v1_dense", {"use_qk_norm": False}),
    ("nemotron", {"attention_bias": True, "mlp_bias": True}),
    ("olmoe", {"attention_bias": True}),
    ("deepseek_v3", {"q_lora_rank": None}),
    ("deepseek_v3", {"attention_bias": True}),
    ("deepseek_v2", {"q_lora_rank": None, "attention_bias": True, "mlp_bias": True}),
    ("glm4_moe", {"use_qk_norm": True, "attention_bias": True}),
    ("deepseek_v3:glm4_moe_lite", {"q_lora_rank": None}),
    ("qwen3_next", {"mlp_only_layers": [0], "attention_bias": True}),
    ("qwen3_next", {"tie_word_embeddings": True}),
    # without per-layer embeddings; the attention's biases; a tied head
    ("qwen4_exp_text", {"ple_layer_ids": None, "attention_bias": True, "tie_word_embeddings": True}),
    ("qwen3_next:qwen3_5_text", {"attention_bias": True, "tie_word_embeddings": True}),
    ("mamba", {"use_bias": True, "use_conv_bias": False}),
    ("mamba:mamba2", {"use_bias": True, "tie_word_embeddings": True}),
    ("jamba", {"mamba_proj_bias": True}),
    ("bamba", {"attention_bias": True, "mlp_bias": True, "mamba_proj_bias": True}),
    ("falcon_h1", {"mamba_rms_norm": True, "projectors_bias": True, "mamba_proj_bias": True, "attention_bias": True,
                   "mlp_bias": True}),
    ("nemotron_h", {"use_bias": True}),
    ("nemotron_h:mlp_moe", {"mlp_bias": True}),
    ("zamba2", {"layers_block_type": ["hybrid", "hybrid"], "num_mem_blocks": 2, "add_bias_linear": True}),
    ("zamba2", {"use_shared_attention_adapter": False}),
    ("mixtral:phimoe", {"attention_bias": False, "lm_head_bias": False}),
    ("llama:ernie4_5_moe", {"use_bias": True}),
    ("hunyuan_v1_dense:hunyuan_v1_moe", {"attention_bias": True}),
    ("cohere:cohere2_moe", {"rms_norm_eps": None}),  # LayerNorms
    ("cohere:cohere2_moe", {"num_shared_experts": 0, "attention_bias": True}),
    ("afmoe", {"attention_bias": True}),
    ("lfm2:lfm2_moe", {"use_expert_bias": False}),
    ("gemma3n", {"num_kv_shared_layers": 1, "layer_types": ["full_attention", "full_attention"]}),
    ("gemma4", {"tie_word_embeddings": False, "attention_bias": True}),
    ("gemma4", {"hidden_size_per_layer_input": 8}),  # per-layer inputs (gemma-4-E2B / E4B)
    # the last layer reuses the first's keys and values, its MLP twice as wide (E2B)
    ("gemma4", {"hidden_size_per_layer_input": 8, "num_kv_shared_layers": 1, "use_double_wide_mlp": True,
                "layer_types": ["full_attention", "full_attention"]}),
    ("gemma4", {"attention_k_eq_v": True, "num_global_key_value_heads": 1}),  # full attention: keys are values (31B)
    # a mixture of experts beside each dense MLP (26B-A4B)
    ("gemma4", {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16}),
] + [  # batch A
    ("kimi_linear", {"q_lora_rank": 16, "attention_bias": True}),
    ("glm4_moe:mimo_v2_flash", {"attention_bias": True}),
    ("longcat_flash", {"attention_bias": True, "router_bias": True}),
    ("glm4_moe:hy_v3", {"attention_bias": True, "mlp_bias": True}),
    ("glm4_moe:laguna", {"attention_bias": True, "gating": "per-channel", "num_attention_heads_per_layer": [4, 8]}),
    # batch B: dense and hybrid families
    ("olmo", {"attention_bias": True, "clip_qkv": 0.5}),
    ("olmo_hybrid", {"layer_types": ["full_attention", "linear_attention"], "attention_bias": True}),
    ("lfm2:lfm3", {"use_sandwich_norm": True}),
    ("lfm2:lfm3", {"use_attention_gate": False, "attention_bias": True, "conv_bias": True,
                   "layer_types": ["full_attention", "conv"]}),
    ("llama:internlm3", {"qkv_bias": True, "bias": True}),
    ("deepseek_v2:minicpm3", {"q_lora_rank": None, "attention_bias": True, "mlp_bias": True}),
    ("glm4_moe:solar_open", {"attention_bias": True}),
    ("deepseek_v2:youtu", {"q_lora_rank": None, "attention_bias": True}),
    ("llama:cwm", {"mlp_bias": True}),
    ("jais2", {"attention_bias": False, "mlp_bias": False}),
    ("nanochat", {"attention_bias": True}),
    ("qwen3_moe:mellum", {"attention_bias": True, "mlp_layer_types": ["sparse", "sparse"]}),
    ("zaya", {"attention_bias": True, "lm_head_bias": True, "tie_word_embeddings": False,
              "layer_types": ["hybrid_sliding", "hybrid"], "sliding_window": 4}),
    # batch C: other decoder families
    ("granitemoe:granitemoe_swa", {"shared_intermediate_size": 0}),
    ("granite:hyperclovax", {"use_post_norm": False}),
    ("bailing_hybrid", {"attention_bias": True}),
    ("qwen3_moe", {"attention_bias": True}),  # o_proj has a bias too
    ("qwen3_moe:flint", {"attention_bias": True}),
    ("doge", {"attention_bias": True, "mlp_bias": True}),
    ("llama:diffllama", {"attention_bias": True}),
    ("aria_text", {"attention_bias": True, "mlp_bias": True}),
    ("doge", {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 4}),  # retrieval experts beside the MLP
    # batch F: classic decoder families
    ("opt", {"enable_bias": False}),
    ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 16}),  # opt-350m: post-norm, projected embeddings
    ("bloom", {"apply_residual_connection_post_layernorm": True}),
    ("persimmon", {"qk_layernorm": False}),
    ("recurrent_gemma", {"attention_bias": True}),
    ("zamba", {"mamba_proj_bias": True}),
    # encoders: masked-LM heads untied (the decoder's weight and bias stored); sinusoidal positions
    ("bert", {"tie_word_embeddings": False}),
    ("roberta", {"tie_word_embeddings": False}),
    ("distilbert", {"tie_word_embeddings": False}),
    ("distilbert", {"sinusoidal_pos_embds": True}),
    ("ernie", {"use_task_id": True}),  # a task type table beside the token types'
    # encoders 2
    ("deberta_v2", {"legacy": False}),  # lm_predictions: the word embeddings give the logits, no decoder
    ("deberta_v2", {"tie_word_embeddings": False}),
    # DeBERTa-v2's: their own projections of the relative positions (unnormalised), absolute positions, token types
    ("deberta_v2", {"share_att_key": False, "norm_rel_ebd": "none", "position_biased_input": True, "type_vocab_size": 2}),
    ("deberta_v2", {"conv_kernel_size": 3}),  # a convolution after the first layer (v2-xlarge)
    ("deberta_v2:tokcls", {"conv_kernel_size": 3}),
    ("deberta", {"legacy": False}),
    ("modernbert", {"norm_bias": True, "mlp_bias": True, "attention_bias": True, "classifier_bias": True}),
    ("modernbert", {"tie_word_embeddings": False, "decoder_bias": False}),
    ("modernbert:seqcls", {"norm_bias": True, "classifier_bias": True}),
    ("electra", {"embedding_size": 16}),
    ("electra:mlm", {"embedding_size": 32}),  # BERT's masked-LM head
    ("electra:mlm", {"embedding_size": 32, "tie_word_embeddings": False}),
    ("electra:tokcls", {"embedding_size": 32}),
    ("roberta_prelayernorm", {"tie_word_embeddings": False}),
    ("xlm_roberta_xl", {"tie_word_embeddings": False}),
    # encoders 3
    ("data2vec_text", {"tie_word_embeddings": False}),
    ("xmod", {"adapter_layer_norm": True}),  # the adapters' own norm
    # encoders 4
    ("modernbert_decoder", {"norm_bias": True, "mlp_bias": True, "attention_bias": True, "decoder_bias": True}),
    ("modernbert_decoder", {"tie_word_embeddings": False}),
    ("modernbert_decoder:seqcls", {"norm_bias": True, "classifier_bias": True}),
    ("roc_bert", {"concat_input": False, "shape_embed_dim": 32, "pronunciation_embed_dim": 32}),  # added to the stream
    ("xmod", {"adapter_reuse_layer_norm": False}),  # the adapters read the stream raw
    ("xmod", {"ln_before_adapter": False}),
    # encoders 4: pre-LN (xmod-large-prenorm), output.LayerNorm called twice, for the MLP and for the adapter
    ("xmod", {"pre_norm": True}),
    ("xmod:seqcls", {"pre_norm": True}),
    ("xmod", {"pre_norm": True, "adapter_layer_norm": True}),
    ("xmod", {"pre_norm": True, "adapter_reuse_layer_norm": False}),
    ("megatron_bert", {"tie_word_embeddings": False}),
    ("roformer", {"embedding_size": 32}),  # BERT's masked-LM head
    ("roformer", {"embedding_size": 32, "tie_word_embeddings": False}),
    # esm, albert
    ("esm", {"position_embedding_type": "absolute", "emb_layer_norm_before": True}),  # ESM-1b
    ("esm:seqcls", {"position_embedding_type": "absolute"}),
    ("esm", {"tie_word_embeddings": False}),
    ("albert", {"embedding_size": 32}),  # as wide as the stream, still projected into it
    ("albert:mlm", {"tie_word_embeddings": False}),
    # mllama, emu3, phi-4-multimodal
    ("mllama", {"cross_attention_layers": [0]}),  # the cross-attention layer first
    ("llama:emu3_text_model", {"attention_bias": True, "mlp_bias": True}),
    # gemma 4 unified
    ("gemma4:gemma4_unified_text", {"tie_word_embeddings": False, "attention_bias": True}),
    # the last layer reuses the first's keys and values (no k_proj, k_norm, v_proj), its MLP twice as wide
    ("gemma4:gemma4_unified_text", {"num_kv_shared_layers": 1, "use_double_wide_mlp": True,
                                    "layer_types": ["full_attention", "full_attention"]}),
    ("gemma4:gemma4_unified_text", {"attention_k_eq_v": True, "num_global_key_value_heads": 1}),  # keys are values
    ("gemma4_assistant", {"use_ordered_embeddings": True, "num_centroids": 8, "centroid_intermediate_top_k": 2}),
    ("gemma4_assistant", {"tie_word_embeddings": False, "text_config": dict(
        FAMILIES["gemma4_assistant"][2]["text_config"], attention_bias=True)}),
    ("gemma4_assistant:gemma4_unified_assistant", {"use_ordered_embeddings": True, "num_centroids": 8,
                                                   "centroid_intermediate_top_k": 2}),
    # beam, cpm-ant, git
    ("beam", {"attention_bias": True, "mlp_layer_types": ["sparse", "dense"]}),
    # chameleon
    ("chameleon", {"attention_bias": True, "mlp_bias": True}),
    # text-embedding encoders
    ("mpnet", {"tie_word_embeddings": False}),
    ("gte", {"type_vocab_size": 0}),  # gte-base-en-v1.5: no token types
    ("eurobert", {"tie_word_embeddings": True}),
    ("eurobert", {"mlp_bias": True, "attention_bias": True}),  # a bias per token on the head too
    ("eurobert:seqcls", {"classifier_pooling": "bos"}),
    # classic encoders
    ("longformer", {"tie_word_embeddings": False}),
    ("layoutlm", {"tie_word_embeddings": False}),
    ("fnet:mlm", {"tie_word_embeddings": False}),
    ("convbert", {"embedding_size": 32}),  # BERT's masked-LM head
    ("convbert", {"embedding_size": 32, "tie_word_embeddings": False}),
    ("convbert", {"num_groups": 2}),  # grouped feed-forward layers
    ("convbert:seqcls", {"num_groups": 2}),
    ("mobilebert", {"normalization_type": "layer_norm"}),  # post-LN
    ("mobilebert:tokcls", {"normalization_type": "layer_norm"}),
    ("mobilebert:seqcls", {"classifier_activation": False}),  # no pooler dense: the classifier reads the stream
    ("mobilebert:mlm", {"tie_word_embeddings": False}),
]
# or first: a bare model's (Muse's text models); ALBERT's stack is its layer groups
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|albert_layer_groups)\.(\d+)\.")
VECTOR_ROLES = {"norm", "norm_bias", "final_norm", "final_norm_bias", "write_norm", "write_bias", "stream_vector",
                "stream_gain"}


def family_of(key: str) -> str:
    """The role table a FAMILIES key tests ("table:model type" where one table serves several,
    "table:layer kinds" where one configuration cannot hold all of its layer kinds, or "table:head" for each
    head class of an encoder)."""
    return key.split(":")[0]


def build(family, extra):
    config_cls, model_cls, kwargs = FAMILIES[family]
    if "Assistant" in model_cls:
        every_layer_shares_kv()
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**kwargs, **extra})  # extra may override the family's kwargs
    model = getattr(transformers, model_cls)(config).eval()
    if model_cls.startswith("Esm"):
        model._weight_conversions = []  # saved as the Hub's checkpoints name their tensors: test_esm_spellings
    return model


def every_layer_shares_kv():
    """transformers 5.23 cannot build Gemma 4's assistants: their configs require every layer to take the target's
    keys and values (num_kv_shared_layers = num_hidden_layers), and Gemma4TextConfig.kv_sharing_modes then finds no
    layer that makes them and raises. Where every layer shares, every layer reuses (what their forward does)."""
    for config in (transformers.Gemma4TextConfig, transformers.Gemma4UnifiedTextConfig):
        modes = config.kv_sharing_modes.fget
        if getattr(modes, "every_layer_shares", False):
            continue

        def patched(self, modes=modes):
            return ["reuse"] * self.num_hidden_layers if self.num_kv_shared_layers == self.num_hidden_layers \
                else modes(self)
        patched.every_layer_shares = True
        config.kv_sharing_modes = property(patched)


def perturbed(model):
    """`model` with its gains and biases away from their 1 / 0 init, so that a norm is not an inner vector
    and no gain is zero (gemma 3n's altup.correct_output_scale starts at 0)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.ndim == 1 and t.is_floating_point():
                t.mul_(1 + 0.3 * torch.randn(t.shape, generator=g)).add_(0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, config.json dict, {saved tensor name: shape}) per case, built once."""
    cache = {}

    def get(family, extra):
        key = (family, json.dumps(extra, sort_keys=True))  # extra may hold lists (layer kinds)
        if key not in cache:
            model = perturbed(build(family, extra))
            out = tmp_path_factory.mktemp(family)
            model.save_pretrained(out, safe_serialization=True)
            config = json.loads((out / "config.json").read_text())
            tensors = safetensors_torch.load_file(out / "model.safetensors")
            cache[key] = model, config, {k: tuple(v.shape) for k, v in tensors.items()}
        return cache[key]

    return get


def case_id(case):
    family, extra = case
    return family + "".join(f"-{k}={v}" for k, v in extra.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_checkpoint_roles(saved, case):
    family, extra = case
    model, config, shapes = saved(family, extra)
    arch = for_config(config)
    assert arch.name == family_of(family) and not arch.inferred
    # (a drafter's in its text_config: Gemma 4's assistants)
    hidden, vocab = arch.hidden_size(config), config.get("vocab_size") or config["text_config"]["vocab_size"]
    assert hidden == 32 and arch.num_layers(config) == 2

    for name, shape in shapes.items():
        r = arch.role(name)
        assert r is not None, name
        m = LAYER.search(name)
        # (or a layer's tensor kept outside the layers, by the index its name ends in: Inkling 2's attention queries)
        outside = r.template.endswith(".{layer}") and int(name.rsplit(".", 1)[1])
        assert r.layer == (int(m.group(1)) if m else outside if outside is not False else None), name
        assert (r.template == name) if r.layer is None else (arch.layer_name(r.template, r.layer) == name)
        # fused experts lead with [E, ...]
        in_dim, out_dim = (-1, -2) if archs.orientation(r.layout, r.role, shape, hidden) == "out_in" else (-2, -1)
        if r.role == "read":
            assert shape[in_dim] == hidden, name
            # without a norm it reads the raw stream (olmo2, gemma 4's per-layer inputs): test_norm_feeds_read; after
            # the layers, the final norm's output (Gemma 4's assistants' post_projection, beside the head)
            norm_roles = ("norm",) if r.layer is not None else ("norm", "final_norm")
            assert r.norm is None or (r.norm in shapes and arch.role(r.norm).role in norm_roles), name
        elif r.role == "write":
            assert shape[out_dim] == hidden, name
        elif r.role == "embedding":
            assert shape == (vocab + EXTRA_EMBEDDING_ROWS.get(family_of(family), 0), hidden), name
        elif r.role == "lm_head":
            assert shape == (vocab, hidden), name
        elif r.role == "lm_head_bias":
            assert shape == (vocab,), name
        elif r.role == "token_table":  # or a column per token (MobileBERT's head's)
            assert shape[0 if r.layout == "out_in" else -1] == config.get("vocab_size_per_layer_input", vocab), name
        elif r.role == "stream_map":
            assert shape == (hidden, hidden), name
        elif r.role == "position_embedding":
            assert shape[1] == hidden, name
        elif r.role == "write_bias":  # one per expert where the experts are fused
            assert shape[-1:] == (hidden,) and len(shape) <= 2, name
        elif r.role in ("norm", "final_norm"):  # over all the parallel residual streams (Qwen4-Exp's)
            assert shape == (hidden * arch.streams(config),), name
        elif r.role == "stream_vector":  # or G of them (Inkling's audio codes, a row per mel bin and level)
            assert shape[-1:] == (hidden,) and len(shape) <= 2, name
        elif r.role in VECTOR_ROLES:
            assert shape == (hidden,), name

    # Completeness: every required template exists at every layer (lm_head only when untied).
    tied = arch.tied(config)
    # (or no embedding in the stream to tie a head to: RemBERT's output table is its own)
    assert tied == (not any(arch.role(n).role == "lm_head" for n in shapes)) or not any(
        arch.role(n).role == "embedding" for n in shapes)
    assert tied == getattr(model.config, "tie_word_embeddings", False)  # a config without the key ties nothing (Inkling's)
    experts = range(next((config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                          if config.get(k)), 0))
    for template in set(arch.tensors).union(*arch.kind_tensors.values(), *arch.layer_tensors.values()):  # each layer's
        for i in range(arch.num_layers(config)) if "{layer}" in template else [None]:
            spec = arch.spec(template, i)
            if spec is None or spec.optional or (tied and spec.role == "lm_head"):
                continue
            name = arch.layer_name(template, i) if i is not None else template
            bare = lambda n: n in shapes or (arch.base_prefix and n.removeprefix(arch.base_prefix) in shapes)  # saved from
            # the base model (BertGenerationEncoder)
            for e in experts if "{expert}" in template else [None]:
                assert bare(name if e is None else name.replace("{expert}", str(e))), template
            if spec.tied_to:
                assert bare(spec.tied_to)

    # The in-memory state dict (which keeps a tied lm_head) is fully classified as well, where it
    # names tensors as checkpoints do (not a mixture of experts' fused ones).
    assert family in MOE or all(arch.role(k) is not None for k in model.state_dict())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_norm_feeds_read(saved, case):
    """Run the model: each read projection's input is exactly its norm's output (or that times a config
    scalar, falcon_h1's multipliers, where it is a multiple of no other norm's output; or, in an unrotatable
    family, the output of the module around the norm that gates it per channel; or, without a
    norm, the residual stream: the layer's input plus what its earlier sublayers added), and each
    write_norm normalises the output of a write projection of its layer (or of the block that sums
    a mixture of experts' writes, or the sum of several such outputs)."""
    model, config, shapes = saved(*case)
    arch = for_config(config)
    modules = dict(model.named_modules())
    # where memory names the base model otherwise (nemotron_h's backbone is model there)
    renamed = arch.base_prefix and arch.base_prefix[:-1] not in modules
    parameters = dict(model.named_parameters())
    # where transformers renames a checkpoint's tensors when it loads them (OLMo Hybrid's norms), or splits one
    # (NomicBERT's Wqkv into q / k / v_proj): a fused read's input is that of the first projection split from it
    conversions = get_model_conversion_mapping(model)
    renamings = [t for t in conversions if isinstance(t, WeightRenaming)] + [
        WeightRenaming(t.source_patterns[0], t.target_patterns[0]) for t in conversions if isinstance(t, WeightConverter)
        and len(t.source_patterns) == 1 and len(t.target_patterns) > 1 and all(isinstance(o, Chunk) for o in t.operations)]

    def in_memory(name):
        if renamed and name.startswith(arch.base_prefix):
            name = model.base_model_prefix + "." + name[len(arch.base_prefix):]
        return name if name in modules or name in parameters else apply_renamings(name, renamings)

    module = lambda tensor_name: in_memory(tensor_name).rsplit(".", 1)[0]
    layer_module = lambda r: in_memory(r.template[:r.template.index(".", r.template.index("{layer}"))].replace(
        "{layer}", str(r.layer)))
    # Inkling 2's attention-residual queries read a stack of the blocks' states, each normalised without a gain, not
    # one stream: test_inkling2_attention_residual_queries_read_the_normalised_block_states
    shapes = {n: s for n, s in shapes.items()
              if module(n).rsplit(".", 1)[-1] not in ("attention_input", "mlp_input", "final_input")}
    inputs, outputs, calls = {}, {}, {}

    def hook(name):
        def record(_, args, kwargs, output):  # gpt-oss calls its attention with keywords only (the model: ids)
            if name not in inputs:  # its first call (DeBERTa's query_proj projects the relative positions after)
                inputs[name], outputs[name] = args[0] if args else kwargs.get("hidden_states"), output
            calls.setdefault(name, []).append(output)  # every call's output (a norm that feeds two reads)
        return record

    layers = {layer_module(arch.role(n)) for n in shapes if arch.role(n).layer is not None}

    def blocks(tensor_name):  # the modules that hold it, inside its layer (a mixture of experts' block)
        layer, parts = layer_module(arch.role(tensor_name)), module(tensor_name).split(".")
        return {".".join(parts[:i]) for i in range(layer.count(".") + 2, len(parts) + 1)}

    writes = {n: blocks(n) for n in shapes if arch.role(n).role == "write" and arch.role(n).layer is not None}
    # a read's parent too: where the parent applies the read's weight without calling its module (LongCat-Flash's
    # router.classifier), the read's input is the parent's
    parents = {module(n).rsplit(".", 1)[0] for n in shapes if arch.role(n).role == "read"}

    def reader(tensor_name):  # the module whose input a read takes: where the read's rows are looked up by index
        # (Doge's retrieval experts, an nn.Embedding whose rows multiply the normalised stream), the block that
        # holds them
        m = module(tensor_name)
        return m.rsplit(".", 1)[0] if isinstance(modules.get(m), torch.nn.Embedding) and arch.role(
            tensor_name).role == "read" else m

    # a norm inside a module of its own that gates its output (A.X-K2's gated norms, in an unrotatable family; or
    # gates the parallel streams and averages them, the first of what it returns: Qwen4-Exp's hyper-connections)
    gated = {n: module(n).rsplit(".", 1)[0] for n in shapes if arch.unrotatable and arch.role(n).role == "norm"
             and module(n).rsplit(".", 1)[0] not in layers}
    watched = [m for m in {module(n) for n in shapes} | {reader(n) for n in shapes} | parents | set(gated.values())
               | layers | set().union(*writes.values()) if m in modules]
    handles = [modules[m].register_forward_hook(hook(m), with_kwargs=True) for m in watched]
    inputs = forward_inputs(case[0])
    with torch.no_grad():
        model(inputs.pop("input_ids", torch.arange(8).unsqueeze(0)), **inputs)
    for h in handles:
        h.remove()

    def first(output):  # a module's output, or the first of the outputs it returns
        return output[0] if isinstance(output, tuple) else output

    def same(x, y):  # the same tensor, or a view of it
        return x is y or (torch.is_tensor(y) and x.data_ptr() == y.data_ptr() and x.numel() == y.numel())

    def sums(tensors, least: int):
        return (sum(chosen[1:], chosen[0]) for k in range(least, len(tensors) + 1)
                for chosen in itertools.combinations(tensors, k))

    def on_stream(x, r, normalise=lambda t: t) -> bool:
        """x is the residual stream where r reads it (normalised, where given how): before the layers the
        embeddings, in a layer its input plus some of what its sublayers added (their write_norms' outputs,
        or, where the norms have no gains to tell them by, their writes')."""
        if r.layer is None:  # or, after the layers, the last one's output (opt-350m's project_out), or its first
            # token's (an encoder's pooler)
            last = next(m for m in layers if m.rsplit(".", 1)[-1] == str(arch.num_layers(config) - 1))
            out = outputs[last][0] if isinstance(outputs[last], tuple) else outputs[last]  # DeBERTa's: (states, attention)
            return any(same(x, outputs[module(n)]) for n in shapes if arch.role(n).role == "embedding") \
                or same(x, out) or same(x, out[:, 0])
        stream = inputs[layer_module(r)]
        added = [outputs[module(n)] for n in shapes if arch.role(n).layer == r.layer and (
            arch.role(n).role == "write_norm" or arch.gainless_norms and arch.role(n).role == "write")]
        candidates = itertools.chain([stream], (stream + a for a in sums(added, 1)))
        if arch.normed_residual:  # post-LN: the residual is a norm's output, plus what later writes of the layer add
            # (X-MOD's adapter that reads the stream raw, after the MLP's add)
            layer = lambda role: [outputs[module(n)].reshape(stream.shape) for n in shapes if arch.role(n).role == role
                                  and arch.role(n).layer == r.layer and outputs[module(n)].numel() == stream.numel()]
            candidates = itertools.chain(candidates, (n + w for n in layer("norm") for w in sums(layer("write"), 1)),
                                         (stream + w for w in sums(layer("write"), 1)))  # pre_norm X-MOD's raw adapter
        return any(torch.allclose(x.reshape(stream.shape), normalise(c)) for c in candidates)

    def rows_of(x, y) -> bool:  # each row of x is a row of y (a copy of a token's, or scaled by a router: llama4)
        if not torch.is_tensor(y) or x.shape[-1] != y.shape[-1]:
            return False
        unit = lambda t: torch.nn.functional.normalize(t.reshape(-1, t.shape[-1]), dim=-1)
        rows, tokens = unit(x), unit(y)
        return bool(((rows @ tokens.T).max(1).values > 1 - 1e-5).logical_or(rows.norm(dim=-1) == 0).all())

    def weightless_norm(t):  # the norm of a family whose norms have no gains (OLMo 1's LayerNorm: eps 1e-5; NanoChat's)
        if arch.norm_type == "layer_norm":
            return torch.nn.functional.layer_norm(t, t.shape[-1:], eps=1e-5)
        return torch.nn.functional.rms_norm(t, t.shape[-1:], eps=model.config.get_text_config().rms_norm_eps)

    for name in (n for n in shapes if module(n) in modules):  # experts are fused in memory: no module each
        r = arch.role(name)
        if r.role == "read" and torch.is_tensor(inputs.get(reader(name))) and not inputs[reader(name)].numel():
            continue  # it ran on no token (X-MOD's adapter of a language the input is not in)
        if r.role == "read" and r.norm is None:
            assert on_stream(inputs[reader(name)], r, weightless_norm if arch.gainless_norms else lambda t: t), name
        elif r.role == "read":
            x = inputs.get(reader(name), inputs.get(module(name).rsplit(".", 1)[0]))
            y = outputs.get(module(r.norm))  # the same tensor, or a view of it (a router's)
            # or a later call's output of the same norm, whose rows x is (X-MOD's pre_norm output.LayerNorm: the MLP's,
            # then the adapter's, which reads the tokens of its language)
            y = next((c for c in calls.get(module(r.norm), [])[1:] if rows_of(x, c)), y)
            if same(x, y) or (r.norm in gated and same(x, first(outputs.get(gated[r.norm])))):
                continue
            if torch.is_tensor(y) and x.shape == y.shape and torch.allclose(x, y * (x.norm() / y.norm())):
                continue  # or it times a constant (gemma 3n's router_input_scale)
            gain = arch.gain_offset(r.norm) + model.get_parameter(in_memory(r.norm))
            if y is None:  # a gain whose module applies it without being called (gemma 3n's altup.correct_output_scale,
                # on the active stream that the layer outputs)
                assert any(torch.allclose(x, stream * gain) for stream in outputs[layer_module(r)]), name
                continue
            if not torch.is_tensor(y):  # a gain that the reader's parent applies after an RMSNorm of its own
                # without one (gemma 4's router.scale): the parent's input normalised, times the gain, up to a
                # constant factor
                h = inputs[module(r.norm)]
                assert module(name).startswith(module(r.norm) + ".") and on_stream(h, r), name
                y = torch.nn.functional.rms_norm(h, h.shape[-1:], eps=model.config.get_text_config().rms_norm_eps) * gain
                assert torch.allclose(x, y * (x.norm() / y.norm()), atol=1e-6), name
                continue
            if len(shapes[name]) == 2 and x.shape == y.shape:
                multiple = lambda t: t.shape == x.shape and torch.allclose(x, t * ((x * t).sum() / (t * t).sum()))
                norms = {module(n) for n in shapes if arch.role(n).role in ("norm", "final_norm")}
                assert [m for m in norms if multiple(y if m == module(r.norm) else outputs[m])] == [module(r.norm)], name
                continue
            # or, for fused experts (dbrx's 2-D too), the tokens routed to them: each row a copy of a token's, or
            # scaled by the router (llama4)
            assert rows_of(x, y), name
        elif r.role == "write_norm" and r.layer is not None:  # a write's output (or that of the block that sums a
            # mixture of experts' writes), or the sum of its layer's other write_norms' outputs (gemma 4: the dense
            # MLP's and the experts' outputs, each normalised, then their sum); outside the layers, a tower's (Inkling's
            # image and audio features, normalised as they take their tokens' places), which a text prompt does not run
            x = inputs[module(name)]
            sublayers = set().union(*(b for n, b in writes.items() if arch.role(n).layer == r.layer))
            others = [outputs[module(n)] for n in shapes
                      if arch.role(n).role == "write_norm" and arch.role(n).layer == r.layer and n != name]
            # or the sum of several of the block's writes (A.X-K1: the routed experts' and the shared experts')
            flat = [outputs[m].reshape(x.shape) for m in sublayers
                    if torch.is_tensor(outputs.get(m)) and outputs[m].numel() == x.numel()]
            assert any(same(x, outputs[m]) for m in sublayers if m in outputs) \
                or any(torch.allclose(x, s) for s in sums(others, 2)) \
                or any(torch.allclose(x, s) for s in sums(flat, 2)), name


def role_table(family):
    """The role table (its variant included) that a FAMILIES key's config chooses. From the key and its
    settings alone: importing transformers' config classes while tests are collected would import
    triton before the Triton tests can set TRITON_INTERPRET."""
    _, model_cls, kwargs = FAMILIES[family]
    return for_config({**kwargs, "architectures": [model_cls], "model_type": family.split(":")[-1]})


ROTATABLE = [f for f in FAMILIES if not role_table(f).rotation_obstacles()]


def rotation_error(family, tmp_path, unit_write_norms=False) -> float:
    """How far turning the residual stream by the role table alone moves the logits (relative); with
    unit_write_norms, after the write norms' gains are set to 1 (where an RMSNorm commutes with the turn)."""
    model = perturbed(build(family, {"tie_word_embeddings": False}))
    model.save_pretrained(tmp_path / "original")
    config = json.loads((tmp_path / "original" / "config.json").read_text())
    arch = for_config(config)
    state = {k: v.double() for k, v in safetensors_torch.load_file(tmp_path / "original" / "model.safetensors").items()}
    if unit_write_norms:  # in the checkpoint's names (transformers renames Kolibri-1's on load)
        state = {k: torch.full_like(v, 1.0 - arch.gain_offset(k)) if arch.role(k).role == "write_norm" else v
                 for k, v in state.items()}
        safetensors_torch.save_file({k: v.float() for k, v in state.items()}, tmp_path / "original" / "model.safetensors",
                                    metadata={"format": "pt"})
        model = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "original").eval()
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    turned = rotate(state, arch, Q)
    (tmp_path / "rotated").mkdir()
    safetensors_torch.save_file({k: v.float() for k, v in turned.items()}, tmp_path / "rotated" / "model.safetensors")
    (tmp_path / "rotated" / "config.json").write_text(json.dumps(config))
    rotated = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "rotated").eval()
    inputs = forward_inputs(family)
    ids = inputs.pop("input_ids", torch.arange(3, 11).unsqueeze(0))
    with torch.no_grad():
        expected, got = model(ids, **inputs).logits, rotated(ids, **inputs).logits
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("family", ROTATABLE)
def test_a_rotation_by_the_role_table_keeps_the_function(family, tmp_path):
    """Every tensor's role is right: turning the residual stream by them leaves the logits as they
    were (a wrong or missing role changes them by percents)."""
    assert rotation_error(family, tmp_path) < 1e-5


@pytest.mark.parametrize("family", ["beam", "afmoe", "kolibri1", "chameleon:swin"])
def test_a_rotation_keeps_the_function_of_sandwich_norms_with_unit_gains(family, tmp_path):
    """Write norms keep these families from being turned (their gains do not commute with a turn), yet at a
    gain of 1 they do: the turn by the role table then checks every other role (a wrong one changes the
    logits by percents), and a perturbed write norm's gain shows why the families are never turned."""
    assert role_table(family).rotation_obstacles() == ["its sublayer outputs are normalised before the residual add"]
    assert rotation_error(family, tmp_path, unit_write_norms=True) < 1e-5
    assert rotation_error(family, tmp_path / "perturbed") > 1e-2


def test_known_architectures():
    """Every table is tested: on its own, or where transformers has no causal LM of it, inside the multimodal
    models that hold it (Mistral Large 4's language model); the encoder-decoder ones in test_encoder_decoder, the
    image and image-text encoders in test_vision_encoders, the remote-code families (whose Hub checkpoints need
    trust_remote_code) as the transformers families they are under other names in test_remote_code_families and
    test_remote_code_families_2."""
    from test_encoder_decoder import COMPOSITIONS as COMPOSED, FAMILIES as ENCODER_DECODER  # compositions: no tables
    from test_multimodal import WRAPPERS
    from test_remote_code_families import TABLES as REMOTE
    from test_remote_code_families_2 import TABLES as REMOTE_CODE_2
    from test_vision_encoders import FAMILIES as VISION

    assert set(known_architectures()) == {family_of(f) for f in FAMILIES} | {family for _, family in WRAPPERS.values()} \
        | {family_of(f) for f in ENCODER_DECODER if f not in COMPOSED} | {family_of(f) for f in VISION} | REMOTE \
        | REMOTE_CODE_2


def test_every_table_parses_and_owns_its_names():
    # tables are parsed where a merge asks for one: this parses them all, and finds a model type or
    # architecture class claimed by two tables (the later would shadow the earlier)
    from seme import architectures

    claimed = {}
    for name in known_architectures():
        family = architectures._family(name)
        assert family.name == name and (family.model_types or family.architectures), name
        for key in [("model_type", t) for t in family.model_types] + [("class", a) for a in family.architectures]:
            assert claimed.setdefault(key, name) == name, f"{key} in {claimed[key]} and {name}"


@pytest.mark.parametrize("family", ["cohere", "minimax", "zaya", "doge", "inkling_text", "inkling2_text"])
def test_a_family_with_rotation_obstacles_is_not_rotation_invariant(family, tmp_path):
    """Why norm_type, normed_residual, stream_gain and unrotatable matter: cohere's LayerNorms have no bias, so
    no role says they subtract the mean; MiniMax's sublayers carry their norm's output on as the residual, so the
    gains scale the stream; ZAYA scales its stream channel by channel, and so do Doge's residual connections;
    Inkling convolves its sublayers' outputs over positions, channel by channel. The turn by any of these role
    tables changes the function."""
    assert role_table(family).rotation_obstacles()
    assert rotation_error(family, tmp_path) > 1e-2


def test_zamba2_is_not_rotation_invariant(tmp_path):
    """Why unrotatable matters: zamba2's shared attention reads the residual stream concatenated with
    the embeddings (inner by its table; weights larger than at init, so that the shared block's share
    of the output shows). The turn by the role table changes its function."""
    family, extra = "zamba2", {"initializer_range": 0.1, "tie_word_embeddings": False}
    model = build(family, extra)
    model.save_pretrained(tmp_path / "original")
    config = json.loads((tmp_path / "original" / "config.json").read_text())
    arch = for_config(config)
    assert family not in ROTATABLE and arch.unrotatable in arch.rotation_obstacles()
    state = {k: v.double() for k, v in safetensors_torch.load_file(tmp_path / "original" / "model.safetensors").items()}
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rotated = build(family, extra)
    rotated.load_state_dict({k: v.float() for k, v in rotate(state, arch, Q).items()})
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        expected, got = model(ids).logits, rotated(ids).logits
    assert float((got - expected).norm() / expected.norm()) > 1e-2


def test_variants_follow_the_config():
    falcon = {"architectures": ["FalconForCausalLM"]}
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    mlp = "transformer.h.0.mlp.dense_h_to_4h.weight"
    assert for_config(falcon).variant == "" and for_config(falcon).role(mlp).norm == "transformer.h.0.input_layernorm.weight"
    new = for_config(dict(falcon, new_decoder_architecture=True))
    assert (new.role(qkv).norm, new.role(mlp).norm) == ("transformer.h.0.ln_attn.weight", "transformer.h.0.ln_mlp.weight")
    assert new.role("transformer.h.0.input_layernorm.weight") is None and new.label == "falcon (new_decoder_architecture=true)"
    assert new is for_config(dict(falcon, new_decoder_architecture=True))  # one object per variant
    one_norm = for_config(dict(falcon, new_decoder_architecture=True, num_ln_in_parallel_attn=1))
    assert one_norm.role(mlp).norm == "transformer.h.0.input_layernorm.weight"
    rw = for_config(dict(falcon, parallel_attn=False))
    assert rw.role(mlp).norm == "transformer.h.0.post_attention_layernorm.weight"
    assert rw.role(qkv).norm == "transformer.h.0.input_layernorm.weight"
    # a variant may set its own norm type: Cohere2-MoE's norms are RMSNorms where its config sets rms_norm_eps
    cohere2_moe = {"architectures": ["Cohere2MoeForCausalLM"], "model_type": "cohere2_moe"}
    assert for_config(cohere2_moe).norm_type == "layer_norm"
    assert for_config(dict(cohere2_moe, rms_norm_eps=None)).norm_type == "layer_norm"
    rms = for_config(dict(cohere2_moe, rms_norm_eps=1e-5))
    assert rms.norm_type == "rms_norm" and not rms.rotation_obstacles()
    assert for_config({"architectures": ["PhimoeForCausalLM"], "model_type": "phimoe"}).norm_type == "layer_norm"
    assert for_config({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}).norm_type == "rms_norm"


def test_nemotron_h_depth_and_latent_experts():
    nemotron = {"architectures": ["NemotronHForCausalLM"]}
    arch = for_config(nemotron)
    assert arch.num_layers(dict(nemotron, layers_block_type=["linear_attention", "moe", "full_attention"])) == 3
    assert arch.num_layers(dict(nemotron, num_hidden_layers=52, hybrid_override_pattern="M-M*")) == 52  # older configs
    expert = "backbone.layers.3.mixer.experts.7.up_proj.weight"
    assert (arch.label, arch.role(expert).role) == ("nemotron_h (moe_latent_size=null)", "read")
    latent = for_config(dict(nemotron, moe_latent_size=1024))
    assert (latent.label, latent.role(expert).role) == ("nemotron_h", "inner")
    assert latent.role("backbone.layers.3.mixer.fc1_latent_proj.weight").norm == "backbone.layers.3.norm.weight"


def test_a_norm_takes_its_layer_kinds_role():
    """OLMo Hybrid's feedforward_layer_norm feeds the MLP in a linear-attention layer, but normalises the
    attention's output in a full-attention one: the config's layer_types choose each layer's roles."""
    config = {"architectures": ["OlmoHybridForCausalLM"], "layer_types": ["linear_attention", "full_attention"]}
    arch = for_config(config)
    assert arch.kinds == ("linear_attention", "full_attention") and arch is for_config(dict(config))
    assert arch.role("model.layers.0.feedforward_layer_norm.weight").role == "norm"
    assert arch.role("model.layers.0.mlp.up_proj.weight").norm == "model.layers.0.feedforward_layer_norm.weight"
    assert arch.role("model.layers.1.feedforward_layer_norm.weight").role == "write_norm"
    assert arch.role("model.layers.1.mlp.up_proj.weight").norm is None
    assert arch.role("model.layers.1.linear_attn.q_proj.weight") is None  # dropped by the kind
    assert arch.role("model.layers.0.self_attn.q_proj.weight") is None
    assert "its sublayer outputs are normalised before the residual add" in arch.rotation_obstacles()


def test_a_config_list_of_layer_indices_binds_their_kind():
    """Mllama's config lists the indices of its cross-attention layers (cross_attention_layers, listed_kind): those
    layers take the kind's roles, the others (past the last listed too) the table's own."""
    arch = for_config({"architectures": ["MllamaForCausalLM"], "cross_attention_layers": [1, 3]})
    assert arch.kinds == ("", "cross_attention", "", "cross_attention")
    for layer, cross in [(0, False), (1, True), (3, True), (4, False)]:
        q = arch.role(f"model.layers.{layer}.cross_attn.q_proj.weight")
        assert (q is not None) == cross and (arch.role(f"model.layers.{layer}.self_attn.q_proj.weight") is None) == cross
        assert arch.role(f"model.layers.{layer}.mlp.up_proj.weight").norm == \
            f"model.layers.{layer}.post_attention_layernorm.weight"
    assert arch.role("model.layers.1.cross_attn.q_proj.weight").norm == "model.layers.1.input_layernorm.weight"
    assert arch.role("model.layers.1.cross_attn.k_proj.weight").role == "inner"  # it reads the image features
    assert arch.role("model.layers.1.cross_attn_mlp_gate").role == "inner" and not arch.rotation_obstacles()
    with pytest.raises(ValueError, match="listed_kind 'cross' has no tensors"):
        archs._parse({**json.loads((Path(archs.__file__).parent / "data" / "mllama.json").read_text()),
                      "layer_kinds": {"key": "cross_attention_layers", "listed_kind": "cross", "tensors": {}}})


def test_gainless_norms():
    """OLMo 1's LayerNorms have no weights: its reads have no gain to fold, and what keeps it from being turned
    is that the norms subtract the mean (test_norm_feeds_read checks that its reads read the normalised stream)."""
    olmo = for_config({"architectures": ["OlmoForCausalLM"], "model_type": "olmo"})
    assert olmo.gainless_norms and not for_config({"model_type": "olmo2"}).gainless_norms
    assert olmo.role("model.layers.0.mlp.up_proj.weight").norm is None
    assert olmo.rotation_obstacles() == ["its norms are LayerNorms, which subtract the mean"]


def test_a_table_is_checked_when_loaded():
    table = {"name": "t", "architectures": [], "model_types": [], "num_layers_key": "n", "hidden_size_key": "d",
             "tie_key": "tie", "tied_default": False, "norm_gain_offset": 0.0,
             "tensors": {"a.norm.bias": {"role": "norm_bias"}}}
    with pytest.raises(ValueError, match="is a norm bias but norm_type is rms_norm"):
        archs._parse(table)
    with pytest.raises(ValueError, match="bad norm_type"):
        archs._parse(dict(table, norm_type="batch_norm"))
    with pytest.raises(ValueError, match="refers to unknown tensor"):
        archs._parse(dict(table, norm_type="layer_norm", variants=[{"when": {"x": 1}, "tensors": {
            "a.norm.bias": None, "a.proj.weight": {"role": "read", "norm": "a.norm.bias"}}}]))
    assert archs._parse(dict(table, norm_type="layer_norm", variants=[{"when": {"x": 1}, "norm_type": "layer_norm"}]))
    with pytest.raises(ValueError, match="is a norm bias but norm_type is rms_norm"):  # checked per variant
        archs._parse(dict(table, norm_type="layer_norm", variants=[{"when": {"x": 1}, "norm_type": "rms_norm"}]))
    with pytest.raises(ValueError, match="bad norm_type"):
        archs._parse(dict(table, norm_type="layer_norm", variants=[{"when": {"x": 1}, "norm_type": "batch_norm"}]))
    with pytest.raises(ValueError, match="has layout either, which only a read or a write can have"):
        archs._parse(dict(table, tensors={"a.embed.weight": {"role": "embedding", "layout": "either"}}))
    with pytest.raises(ValueError, match=r"has unknown keys \['after_layer'\]"):  # a misspelt key is no default
        archs._parse(dict(table, tensors={"a.norm.weight": {"role": "norm", "after_layer": True}}))
    with pytest.raises(ValueError, match="has a gain_offset, which only a norm's gain can have"):
        archs._parse(dict(table, tensors={"a.proj.weight": {"role": "read", "gain_offset": 0.0}}))
    with pytest.raises(ValueError, match="only a norm outside the layers can be after_layers"):
        archs._parse(dict(table, tensors={"a.{layer}.norm.weight": {"role": "norm", "after_layers": True}}))


def test_a_layout_either_is_told_by_the_shape():
    """Fused experts kept [E, out, in] or [E, in, out]: out_in where the residual width (8) sits where a read's
    input or a write's output does in memory, as transformers decides when it loads them (so where both fit)."""
    assert archs.orientation("either", "read", (4, 6, 8), 8) == "out_in"
    assert archs.orientation("either", "read", (4, 8, 6), 8) == "in_out"
    assert archs.orientation("either", "write", (4, 8, 3), 8) == "out_in"
    assert archs.orientation("either", "write", (4, 3, 8), 8) == "in_out"
    assert archs.orientation("either", "read", (4, 8, 8), 8) == "out_in"
    assert archs.orientation("in_out", "read", (4, 6, 8), 8) == "in_out"



def test_a_split_table_and_parallel_streams():
    """A table that checkpoints split into row blocks has one role for every shard_N ({shard}, the inner index after
    {layer}); a family with parallel residual streams counts them from its config (Qwen4-Exp's hc_count), others
    keep one."""
    qwen4 = for_config({"model_type": "qwen4_exp_text", "architectures": ["Qwen4ExpForCausalLM"], "hc_count": 4})
    shard = qwen4.role("model.layers.3.ple.ple_embedding.ngram_embedding.shard_17.weight")
    assert (shard.role, shard.layer) == ("inner", 3)
    assert shard.template == "model.layers.{layer}.ple.ple_embedding.ngram_embedding.shard_17.weight"
    assert qwen4.streams({"hc_count": 4}) == 4 and qwen4.rotation_obstacles() == [qwen4.unrotatable]
    assert for_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).streams({}) == 1


def test_match_order():
    assert for_config({"architectures": ["Qwen2ForCausalLM"], "model_type": "llama"}).name == "qwen2"
    assert for_config({"architectures": ["LlamaForTokenClassification"], "model_type": "llama"}).name == "llama"
    assert for_config({"model_type": "gpt2"}).name == "gpt2"
    assert for_config({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2"}).name == "deepseek_v3"


def test_a_head_never_tied():
    # CpmAntConfig says tie_word_embeddings true by default, yet transformers ties nothing: checkpoints store the head
    arch = for_config({"architectures": ["CpmAntForCausalLM"]})
    assert not arch.tied({}) and not arch.tied({"tie_word_embeddings": True})
    assert arch.role("lm_head.weight").tied_to is None


def test_llama_claims_the_early_spelling_of_its_class():
    # mergekit's llama.json lists LLaMaForCausalLM: a config that names it gets llama's table, model_type or not
    for config in ({"architectures": ["LLaMaForCausalLM"]}, {"architectures": ["LLaMaForCausalLM"], "model_type": "llama"}):
        arch = for_config(config)
        assert arch.name == "llama" and not arch.inferred
        assert arch.role("model.layers.3.mlp.up_proj.weight").norm == "model.layers.3.post_attention_layernorm.weight"


def test_gpt2_without_base_prefix():
    arch = for_config({"architectures": ["GPT2Model"]})
    r = arch.role("h.1.mlp.c_fc.weight")
    assert (r.role, r.layer, r.layout, r.norm) == ("read", 1, "in_out", "h.1.ln_2.weight")
    assert arch.role("wte.weight").role == "embedding"
    assert arch.role("h.0.attn.bias").role == "buffer"
    assert arch.rename_layer("h.1.mlp.c_fc.weight", 11) == "h.11.mlp.c_fc.weight"
    assert arch.tied({"n_layer": 12})  # Hub gpt2 config.json has no tie_word_embeddings


def test_gpt2_cross_attention_only_where_the_config_adds_it():
    arch = for_config({"architectures": ["GPT2Model"], "add_cross_attention": True})
    r = arch.role("h.1.crossattention.q_attn.weight")
    assert (r.role, r.layer, r.layout, r.norm) == ("read", 1, "in_out", "h.1.ln_cross_attn.weight")
    assert arch.role("h.1.crossattention.c_attn.weight").role == "inner"  # the encoder's output
    assert arch.role("h.0.crossattention.bias").role == "buffer"
    assert for_config({"architectures": ["GPT2Model"]}).role("h.1.crossattention.q_attn.weight") is None


def test_encoders_without_base_prefix_and_with_legacy_names():
    """Checkpoints saved from BertModel / RobertaModel / DistilBertModel lack the head class's prefix; BERT's
    TF-era checkpoints (bert-base-uncased) name LayerNorm gains gamma and biases beta, which transformers renames."""
    bert = for_config({"architectures": ["BertModel"], "model_type": "bert"})
    r = bert.role("encoder.layer.3.intermediate.dense.weight")
    assert (r.role, r.layer, r.norm) == ("read", 3, "encoder.layer.3.attention.output.LayerNorm.weight")
    assert bert.rename_layer("encoder.layer.3.output.LayerNorm.gamma", 7) == "encoder.layer.7.output.LayerNorm.gamma"
    assert bert.role("bert.encoder.layer.0.attention.output.LayerNorm.beta").role == "norm_bias"
    assert bert.role("embeddings.token_type_embeddings.weight").role == "position_embedding"
    assert bert.role("bert.embeddings.position_ids").role == "buffer"
    assert bert.role("pooler.dense.weight").role == "read" and bert.role("classifier.weight").role == "inner"
    assert bert.tied({}) and bert.rotation_obstacles()
    tokens = for_config({"architectures": ["BertForTokenClassification"], "model_type": "bert"})
    assert tokens.role("classifier.weight").role == "read"  # on every token's stream, not the pooler's output
    head = bert.role("cls.predictions.decoder.bias")
    assert (head.role, head.tied_to) == ("lm_head_bias", "cls.predictions.bias")
    roberta = for_config({"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"})
    assert roberta.name == "roberta" and roberta.role("encoder.layer.1.output.dense.weight").role == "write"
    assert for_config({"architectures": ["CamembertForMultipleChoice"]}).role("classifier.weight").role == "inner"
    distil = for_config({"architectures": ["DistilBertModel"], "n_layers": 6, "dim": 768})
    assert distil.num_layers({"n_layers": 6}) == 6 and distil.hidden_size({"dim": 768}) == 768
    assert distil.role("transformer.layer.5.ffn.lin1.weight").norm == "transformer.layer.5.sa_layer_norm.weight"


def test_embedding_encoders_saved_bare_and_as_nomics_remote_code_configures_them():
    """Embedding checkpoints (all-mpnet-base-v2, nomic-embed-text, gte-base-en-v1.5) are base models saved without
    the head class's prefix; nomic's remote-code configs give the width and depth GPT-2's names; the post-LN ones
    cannot be turned, EuroBERT (pre-RMSNorm) can."""
    mpnet = for_config({"architectures": ["MPNetModel"], "model_type": "mpnet"})
    r = mpnet.role("encoder.layer.3.intermediate.dense.weight")
    assert (r.role, r.layer, r.norm) == ("read", 3, "encoder.layer.3.attention.LayerNorm.weight")
    assert mpnet.role("encoder.relative_attention_bias.weight").role == "inner"
    assert mpnet.role("embeddings.position_ids").role == "buffer" and mpnet.role("pooler.dense.weight").role == "read"
    nomic = for_config({"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "n_embd": 768, "n_layer": 12})
    assert nomic.hidden_size({"n_embd": 768}) == 768 and nomic.num_layers({"n_layer": 12}) == 12
    assert nomic.role("encoder.layers.11.attn.Wqkv.weight").role == "read"
    assert nomic.role("encoder.layers.11.mlp.fc12.weight").norm == "encoder.layers.11.norm1.weight"
    gte = for_config({"architectures": ["GteModel"], "model_type": "gte"})
    assert gte.role("encoder.layer.0.mlp.up_gate_proj.weight").norm == "encoder.layer.0.attn_ln.weight"
    assert all(arch.rotation_obstacles() for arch in (mpnet, nomic, gte))
    eurobert = for_config({"architectures": ["EuroBertModel"], "model_type": "eurobert"})
    assert eurobert.role("layers.0.mlp.up_proj.weight").norm == "layers.0.post_attention_layernorm.weight"
    assert not eurobert.rotation_obstacles()


def test_classic_encoders_roles_follow_the_config():
    """Longformer's global projections read the stream as query / key / value do, in checkpoints saved bare too;
    LayoutLM's 2-D position tables add rows to the stream; FNet's embeddings and ConvBERT's narrower ones are
    projected into it; ConvBERT's grouped feed-forward layers ({"other_than": 1} num_groups) are inner; the Fourier
    transform and the depthwise convolution keep FNet and ConvBERT from being turned, whatever their norms; MobileBERT's
    NoNorms scale its stream (or, as LayerNorms, normalise it) and its pooler-less classifiers read the stream."""
    longformer = for_config({"architectures": ["LongformerModel"], "model_type": "longformer"})
    r = longformer.role("encoder.layer.5.attention.self.value_global.weight")
    assert (r.role, r.layer, r.norm) == ("read", 5, None)
    assert longformer.role("longformer.pooler.dense.weight").role == "read"
    assert for_config({"architectures": ["LongformerForMultipleChoice"]}).role("classifier.weight").role == "inner"
    layoutlm = for_config({"architectures": ["LayoutLMForTokenClassification"], "model_type": "layoutlm"})
    assert layoutlm.role("layoutlm.embeddings.h_position_embeddings.weight").role == "position_embedding"
    assert layoutlm.role("classifier.weight").role == "read"
    assert for_config({"architectures": ["LayoutLMForSequenceClassification"]}).role("classifier.weight").role == "inner"
    fnet = for_config({"architectures": ["FNetModel"], "model_type": "fnet"})
    assert [fnet.role(n).role for n in ("embeddings.word_embeddings.weight", "embeddings.projection.weight",
                                        "embeddings.LayerNorm.weight")] == ["token_table", "write", "inner"]
    assert "Fourier" in fnet.unrotatable
    convbert = {"architectures": ["ConvBertForMaskedLM"], "hidden_size": 384, "embedding_size": 384, "num_groups": 1}
    ffn = "convbert.encoder.layer.3.intermediate.dense.weight"
    assert for_config(convbert).role(ffn).norm == "convbert.encoder.layer.3.attention.output.LayerNorm.weight"
    assert for_config(convbert).role("generator_predictions.dense.weight").role == "stream_map"
    grouped = for_config(dict(convbert, embedding_size=128, num_groups=2))
    assert grouped.role(ffn).role == "inner" and grouped.role("convbert.embeddings_project.weight").role == "write"
    assert grouped.role("generator_lm_head.weight").role == "token_table"
    assert for_config(dict(convbert, num_groups=2)).role("generator_lm_head.weight").role == "lm_head"
    assert "depthwise" in for_config(convbert).unrotatable
    assert for_config({"architectures": ["ConvBertForMaskedLM"]}).label == "convbert"  # num_groups unset: not grouped
    # MobileBERT's NoNorms scale the stream per channel; as LayerNorms they are post-LN norms; its FFNs stack ({ffn})
    mobilebert = for_config({"architectures": ["MobileBertForMaskedLM"]})
    gain = "mobilebert.encoder.layer.2.output.bottleneck.LayerNorm.weight"
    assert mobilebert.role(gain).role == "stream_gain" and mobilebert.role(gain.replace("weight", "bias")).role == \
        "stream_vector"
    assert mobilebert.role("encoder.layer.2.ffn.5.output.dense.weight").template == \
        "encoder.layer.{layer}.ffn.5.output.dense.weight"
    assert mobilebert.role("cls.predictions.dense.weight").layout == "in_out"
    normed = for_config({"architectures": ["MobileBertForMaskedLM"], "normalization_type": "layer_norm"})
    assert normed.role(gain).role == "norm" and normed.normed_residual
    raw = for_config({"architectures": ["MobileBertForSequenceClassification"], "classifier_activation": False})
    assert raw.role("classifier.weight").role == "read"


def test_encoders_2_roles_follow_the_config():
    """ELECTRA's embeddings lie outside the stream where embedding_size differs from hidden_size (a when value
    {"differs_from": key}); ModernBERT's first layer has no attention norm (layer_tensors); DeBERTa-v2's convolution
    makes its variant unrotatable, whatever the head's variant."""
    electra = {"architectures": ["ElectraForMaskedLM"], "hidden_size": 256}
    word = "electra.embeddings.word_embeddings.weight"
    assert for_config(dict(electra, embedding_size=256)).role(word).role == "embedding"
    projected = for_config(dict(electra, embedding_size=128))
    assert projected.role(word).role == "token_table" and projected.role("embeddings_project.weight").role == "write"
    assert projected.label == 'electra (embedding_size={"differs_from": "hidden_size"})'
    assert for_config({"architectures": ["ElectraForPreTraining"], "hidden_size": 256}).role(word).role == "embedding"
    choice = for_config(dict(electra, architectures=["ElectraForMultipleChoice"], embedding_size=128))
    assert choice.role("classifier.weight").role == "inner" and choice.role(word).role == "token_table"
    modernbert = for_config({"architectures": ["ModernBertForMaskedLM"]})
    assert modernbert.role("model.layers.0.attn.Wqkv.weight").norm is None
    assert modernbert.role("model.layers.0.attn_norm.weight") is None
    assert modernbert.role("model.layers.3.attn.Wqkv.weight").norm == "model.layers.3.attn_norm.weight"
    assert modernbert.rename_layer("model.layers.0.attn.Wqkv.weight", 3) == "model.layers.3.attn.Wqkv.weight"
    deberta = {"architectures": ["DebertaV2ForTokenClassification"], "model_type": "deberta-v2"}
    assert not for_config(deberta).unrotatable and for_config(deberta).role("classifier.weight").role == "read"
    conv = for_config(dict(deberta, conv_kernel_size=3))
    assert "ConvLayer" in conv.unrotatable and conv.role("classifier.weight").role == "read"
    assert conv.role("deberta.encoder.conv.LayerNorm.weight").role == "norm"


def test_encoders_3_roles_follow_the_config():
    """X-MOD's adapters are named by the config's languages (named_entries), whatever the variant; BERT's
    cross-attention (add_cross_attention) reads the encoder's output with its key and value, and its LayerNorm then
    feeds the MLP."""
    xmod = {"architectures": ["XmodForSequenceClassification"], "languages": ["en_XX", "ta_IN"], "adapter_layer_norm": True}
    adapter = "roberta.encoder.layer.4.output.adapter_modules.ta_IN.dense1.weight"
    r = for_config(xmod).role(adapter)
    assert (r.role, r.layer, r.norm) == ("read", 4, "roberta.encoder.layer.4.output.adapter_layer_norm.weight")
    assert for_config(xmod).rename_layer(adapter, 7) == adapter.replace(".4.", ".7.")
    assert for_config(dict(xmod, languages=["en_XX"])).role(adapter) is None
    assert for_config(dict(xmod, adapter_layer_norm=False)).role(adapter).norm == "roberta.encoder.layer.4.output.LayerNorm.weight"
    assert for_config(xmod) is for_config(dict(xmod))  # one object per variant and languages
    cross = for_config({"architectures": ["BertLMHeadModel"], "add_cross_attention": True, "is_decoder": True})
    assert cross.role("bert.encoder.layer.1.crossattention.self.key.weight").role == "inner"
    assert cross.role("bert.encoder.layer.1.intermediate.dense.weight").norm == \
        "bert.encoder.layer.1.crossattention.output.LayerNorm.weight"
    assert for_config({"architectures": ["BertLMHeadModel"]}).role("bert.encoder.layer.1.crossattention.output.dense.weight") is None
    # ELECTRA's multiple-choice summary projects the first token (a read; the classifier reads its output)
    choice = for_config({"architectures": ["ElectraForMultipleChoice"], "embedding_size": 16, "hidden_size": 32})
    assert [choice.role(n).role for n in ("sequence_summary.summary.weight", "classifier.weight")] == ["read", "inner"]
    # RoFormer's multiple-choice summary is the last token itself: its classifier reads the stream
    assert for_config({"architectures": ["RoFormerForMultipleChoice"], "embedding_size": 16,
                       "hidden_size": 32}).role("classifier.weight").role == "read"


def test_an_unloaded_module_keeps_its_names_beside_a_nested_language_model():
    """Qwen3.5's multi-token-prediction module (mtp.*, which transformers does not load) is described
    by the table, at the top level of the checkpoint, whether or not a multimodal model nests the
    language model."""
    text = {"model_type": "qwen3_5_text", "num_hidden_layers": 2, "hidden_size": 32}
    names = ["model.language_model.layers.0.input_layernorm.weight", "model.visual.blocks.0.attn.qkv.weight",
             "mtp.fc.weight"]
    for config, layers in (({"architectures": ["Qwen3_5ForCausalLM"], **text}, "model.layers.0."),
                           ({"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": text},
                            "model.language_model.layers.0.")):
        arch = for_config(config, names)
        assert arch.name == "qwen3_next" and arch.unloaded_module("mtp.fc.weight") == "mtp."
        r = arch.role("mtp.layers.0.mlp.gate_proj.weight")
        assert (r.role, r.layer, r.norm) == ("read", 0, "mtp.layers.0.post_attention_layernorm.weight")
        assert arch.unloaded_module(layers + "mlp.gate_proj.weight") is None
        assert arch.role(layers + "mlp.gate_proj.weight").norm == layers + "post_attention_layernorm.weight"

def test_rename_layer():
    arch = for_config({"architectures": ["LlamaForCausalLM"]})
    assert arch.rename_layer("model.layers.3.self_attn.q_proj.weight", 10) == \
        "model.layers.10.self_attn.q_proj.weight"
    r = arch.role("model.layers.10.mlp.gate_proj.weight")
    assert r.norm == "model.layers.10.post_attention_layernorm.weight"
    assert arch.role("model.layers.1.unknown.weight") is None
    with pytest.raises(ValueError):
        arch.rename_layer("model.norm.weight", 1)


def test_gemma_semantics():
    g2 = for_config({"architectures": ["Gemma2ForCausalLM"]})
    assert g2.norm_gain_offset == 1.0 and g2.tied({})
    assert g2.role("model.layers.0.post_attention_layernorm.weight").role == "write_norm"
    assert g2.role("model.layers.0.post_feedforward_layernorm.weight").role == "write_norm"
    assert g2.role("model.layers.0.mlp.up_proj.weight").norm == "model.layers.0.pre_feedforward_layernorm.weight"
    assert for_config({"model_type": "qwen3"}).norm_gain_offset == 0.0
    vault = for_config({"architectures": ["VaultGemmaForCausalLM"], "model_type": "vaultgemma"})
    assert vault.label == 'gemma2 (model_type="vaultgemma")' and vault.norm_gain_offset == 1.0
    assert vault.role("model.layers.0.post_attention_layernorm.weight") is None
    g4 = for_config({"architectures": ["Gemma4ForCausalLM"]})
    assert g4.norm_gain_offset == 0.0 and g4.tied({})  # Gemma 4's RMSNorm multiplies by w itself
    assert g4.role("model.embed_tokens_per_layer.weight").role == "token_table"  # rows per token, not the stream's


def test_a_norm_may_have_its_own_gain_offset():
    """Muse Glimmer's and Muse Spark's layers' RMSNorms multiply by (1 + w), their final norm (Gemma 4's) by w: a
    tensor's gain offset is its spec's own where it sets one, else the family's, in a multimodal wrapper too."""
    for family in ("muse_glimmer_text", "muse_spark_text"):
        arch = for_config({"model_type": family})
        assert arch.norm_gain_offset == 1.0 and arch.gain_offset("model.norm.weight") == 0.0
        for norm in ("input_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            assert arch.gain_offset(f"model.layers.3.{norm}.weight") == 1.0
    prefix = "model.language_model."
    wrapped = for_config({"architectures": ["MuseGlimmerForConditionalGeneration"], "model_type": "muse_glimmer",
                          "text_config": {"model_type": "muse_glimmer_text"}},
                         [prefix + "norm.weight", prefix + "layers.0.input_layernorm.weight", "lm_head.weight"])
    assert wrapped.gain_offset(prefix + "norm.weight") == 0.0
    assert wrapped.gain_offset(prefix + "layers.0.input_layernorm.weight") == 1.0
    assert for_config({"model_type": "gemma2"}).gain_offset("model.norm.weight") == 1.0  # the family's


def test_inferred_fallback(saved):
    _, config, shapes = saved("llama", {})
    unknown = dict(config, architectures=["MysteryForCausalLM"], model_type="mystery")
    with pytest.warns(UserWarning, match="unknown architecture") as record:
        arch = for_config(unknown)
    assert len(record) == 1
    assert arch.inferred and arch.name == "inferred"
    assert arch.num_layers(unknown) == 2 and arch.hidden_size(unknown) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lookups must not warn again
        roles = {name: arch.role(name) for name in shapes}
    llama = for_config(config)
    for name, r in roles.items():
        assert r is not None and r.layer == llama.role(name).layer, name
        assert r.role == llama.role(name).role, name  # llama names are unambiguous
    assert arch.rename_layer("model.layers.0.mlp.down_proj.weight", 4) == "model.layers.4.mlp.down_proj.weight"
    assert arch.role("transformer.h.2.attn.c_attn.bias").role == "inner"
    assert arch.role("transformer.h.2.ln_1.bias").role == "norm_bias"
    assert arch.role("transformer.wpe.weight").role == "position_embedding"
    assert arch.role("transformer.ln_f.weight").role == "final_norm"
    assert arch.role("embed_out.weight").role == "lm_head"  # gpt_neox's head is no embedding
    assert arch.role("lm_head.bias").role == "lm_head_bias"
    assert arch.role("model.embedding_norm.weight").role == "final_norm"  # a norm, whatever its name says


def test_a_checkpoint_its_table_does_not_describe_falls_back_to_inferred_roles(llama_family, tmp_path, capsys):
    """A checkpoint whose architecture names a table but whose tensors do not follow it (ChatGLM-6B's layout under
    ChatGLMModel, which chatglm's table describes for ChatGLM2 onwards): roles are inferred from the names, with a
    warning, and a merge goes on as it does for an unknown architecture (before: an error about a missing head)."""
    import shutil

    import torch
    import yaml

    from conftest import load_folder
    from seme.merge import main

    relabelled = {}
    for m in ("base", "expert0"):
        relabelled[m] = tmp_path / m
        shutil.copytree(llama_family[m], relabelled[m])
        config = json.loads((relabelled[m] / "config.json").read_text())
        config.update(architectures=["ChatGLMModel"], model_type="chatglm", num_layers=config["num_hidden_layers"])
        (relabelled[m] / "config.json").write_text(json.dumps(config))
    names = load_folder(relabelled["base"]).keys()
    with pytest.warns(UserWarning, match="do not follow seme's chatglm table") as record:
        arch = for_config(json.loads((relabelled["base"] / "config.json").read_text()), names)
    assert len(record) == 1 and arch.inferred
    assert not for_config(json.loads((Path(llama_family["base"]) / "config.json").read_text()), names).inferred

    def ties(base, expert):
        return {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                "models": [{"model": str(expert), "parameters": {"weight": 0.7, "density": 0.5}}]}

    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties(relabelled["base"], relabelled["expert0"])))
    assert main([str(recipe), str(tmp_path / "out")]) == 0
    assert ("seme: warning: the tensors of this ChatGLMModel checkpoint do not follow seme's chatglm table"
            in capsys.readouterr().err)
    recipe.write_text(yaml.safe_dump(ties(llama_family["base"], llama_family["expert0"])))
    assert main([str(recipe), str(tmp_path / "plain")]) == 0
    ours, plain = load_folder(tmp_path / "out"), load_folder(tmp_path / "plain")
    assert ours.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=0, atol=0, msg=name)


def test_loader_imports_only_stdlib():
    tree = ast.parse(Path(archs.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "json", "re", "warnings", "dataclasses", "functools", "importlib", "seme"}
    errors = ast.parse(Path(archs.__file__).parent.parent.joinpath("errors.py").read_text())
    assert not [node for node in ast.walk(errors) if isinstance(node, (ast.Import, ast.ImportFrom))]


def merged_with_a_repeated_layer(family: str, tmp_path, tuned: int):
    """task_arithmetic of `tuned` fine-tunes over slices that repeat layer 1 (layers 0, 1, 1), reloaded in
    transformers: (model, its loading info, the merged tensors)."""
    import yaml

    import seme

    base = perturbed(build(family, {}))
    paths = [tmp_path / "base"] + [tmp_path / f"tuned{i}" for i in range(tuned)]
    base.save_pretrained(paths[0])
    g = torch.Generator().manual_seed(3)
    for path in paths[1:]:
        model = build(family, {})
        model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
        model.save_pretrained(path)
    sources = lambda layers: [{"model": str(p), "layer_range": layers, **({} if p == paths[0] else {
        "parameters": {"weight": 0.5}})} for p in paths]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(paths[0]), "dtype": "float32",
              "slices": [{"sources": sources([0, 2])}, {"sources": sources([1, 2])}]}
    seme.merge(yaml.safe_dump(recipe), str(tmp_path / "merged"), progress=False)
    merged, info = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "merged",
                                                                               output_loading_info=True)
    return merged.eval(), info, safetensors_torch.load_file(tmp_path / "merged" / "model.safetensors")


@pytest.mark.parametrize("family", ["deberta_v2", "deberta", "modernbert", "electra", "electra:mlm", "roberta_prelayernorm",
                                    "xlm_roberta_xl",
                                    "data2vec_text", "xmod", "megatron_bert:tokcls", "bert_generation", "big_bird:seqcls",
                                    "rembert", "roformer", "longformer", "layoutlm:seqcls",
                                    "fnet:mlm", "convbert", "mobilebert:mlm"])  # encoders 3; classic encoders
def test_an_encoder_2_merges_end_to_end(family, tmp_path):
    """The merged model reloads in transformers at its new depth and runs (Longformer's window per layer, a config
    list, follows the layers)."""
    merged, info, state = merged_with_a_repeated_layer(family, tmp_path, tuned=3)
    assert merged.config.num_hidden_layers == 3 and not info["missing_keys"] and not info["unexpected_keys"], info
    repeated = [n for n in state if LAYER.search(n) and LAYER.search(n).group(1) == "2"]
    assert repeated and all(torch.equal(state[n], state[n.replace(".2.", ".1.")]) for n in repeated)
    with torch.no_grad():
        assert torch.isfinite(merged(torch.arange(3, 11).unsqueeze(0)).logits).all()


def task_arithmetic_of_fine_tunes(family: str, tmp_path, save=lambda model, path: model.save_pretrained(path),
                                  layer_ranges=None):
    """task_arithmetic of two fine-tunes (the base perturbed) of a FAMILIES key, saved by `save`, whole or in
    slices of `layer_ranges`: the merged model reloaded in transformers, its loading info, the merged tensors."""
    import yaml

    import seme

    base = perturbed(build(family, {}))
    paths = [tmp_path / "base", tmp_path / "tuned0", tmp_path / "tuned1"]
    save(base, paths[0])
    g = torch.Generator().manual_seed(3)
    for path in paths[1:]:
        model = build(family, {})
        model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
        save(model, path)
    models = [{"model": str(p), **({"parameters": {"weight": 0.5}} if p != paths[0] else {})} for p in paths]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(paths[0]), "dtype": "float32",
              **({"models": models[1:]} if layer_ranges is None else
                 {"slices": [{"sources": [dict(m, layer_range=r) for m in models]} for r in layer_ranges]})}
    seme.merge(yaml.safe_dump(recipe), str(tmp_path / "merged"), progress=False)
    merged, info = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "merged",
                                                                               output_loading_info=True)
    return merged.eval(), info, safetensors_torch.load_file(tmp_path / "merged" / "model.safetensors")


def fresh_save(model, path):
    """Save as transformers 5.23 saves a model built from a config: ESM's load renamings reversed."""
    del model._weight_conversions
    model.save_pretrained(path)


@pytest.mark.parametrize("family,save", [("esm", None), ("esm:seqcls", None), ("esm", fresh_save)])
def test_esm_fine_tunes_merge_and_reload(family, save, tmp_path):
    """Merged ESM-2 fine-tunes reload in transformers with every tensor and run; so do those saved as 5.23 saves
    a model built from a config (gamma / beta, the rotary buffer's literal '*' name)."""
    merged, info, state = task_arithmetic_of_fine_tunes(family, tmp_path, **({"save": save} if save else {}))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (save is None) != any(n.endswith("LayerNorm.gamma") for n in state)
    with torch.no_grad():
        assert torch.isfinite(merged(torch.arange(3, 11).unsqueeze(0)).logits).all()


def test_esm_spellings():
    """Every name ESM checkpoints give their tensors has its role: the Hub's (the per-layer rotary buffers, the
    unused position table and the position_ids buffer of transformers 4's conversions; the weight / bias of the
    layers' LayerNorms) and those transformers 5.23 saves for a model built from a config (gamma / beta, one
    rotary buffer under a literal '*')."""
    rotary = for_config({"architectures": ["EsmForMaskedLM"], "position_embedding_type": "rotary"})
    for name, role, layer in [("esm.encoder.layer.5.attention.self.rotary_embeddings.inv_freq", "buffer", 5),
                              ("esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq", "buffer", None),
                              ("esm.rotary_embeddings.inv_freq", "buffer", None),
                              ("esm.embeddings.position_embeddings.weight", "inner", None),
                              ("esm.embeddings.position_ids", "buffer", None),
                              ("esm.encoder.layer.5.attention.LayerNorm.weight", "norm", 5),
                              ("esm.encoder.layer.5.attention.LayerNorm.gamma", "norm", 5),
                              ("esm.encoder.layer.5.LayerNorm.beta", "norm_bias", 5),
                              ("esm.pooler.dense.weight", "read", None)]:
        assert (rotary.role(name).role, rotary.role(name).layer) == (role, layer), name
    absolute = for_config({"architectures": ["EsmForMaskedLM"], "position_embedding_type": "absolute"})
    assert absolute.role("esm.embeddings.position_embeddings.weight").role == "position_embedding"
    assert rotary.role("esm.contact_head.regression.weight").layer_blocks == 1


def test_a_sliced_esm_merge_is_refused(tmp_path):
    """The contact head reads every layer's attention maps, a column per layer and head: slices that repeat a layer
    would leave it a layer short."""
    from seme.errors import SemeError

    with pytest.raises(SemeError, match=r"esm.contact_head.regression.weight packs a block for each of its 2 layers"):
        task_arithmetic_of_fine_tunes("esm", tmp_path, layer_ranges=[[0, 2], [1, 2]])


@pytest.mark.parametrize("layer_ranges", [None, [[0, 1], [1, 2]]])
def test_albert_fine_tunes_merge_and_reload(layer_ranges, tmp_path):
    """Merged ALBERT fine-tunes reload in transformers with every tensor and run: whole, or in slices that keep each
    layer group in place."""
    merged, info, state = task_arithmetic_of_fine_tunes("albert:seqcls", tmp_path, layer_ranges=layer_ranges)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert merged.config.num_hidden_groups == 2 and merged.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(merged(torch.arange(3, 11).unsqueeze(0)).logits).all()


def test_a_sliced_albert_merge_that_repeats_a_layer_group_is_refused(tmp_path):
    """Layer i runs group int(i / (num_hidden_layers / num_hidden_groups)): a repeated group would not add a layer."""
    from seme.errors import SemeError

    with pytest.raises(SemeError, match=r"slices move, drop or repeat layers of albert, whose layers must stay in "
                                        r"place: its layer groups are shared across depth"):
        task_arithmetic_of_fine_tunes("albert:seqcls", tmp_path, layer_ranges=[[0, 2], [1, 2]])


@pytest.mark.parametrize("family,extra", [("modernbert", {}), ("megatron_bert:qa", {}), ("xlm_roberta_xl", {}),
                                          ("roberta_prelayernorm", {}), ("xmod", {"pre_norm": True}),
                                          ("big_bird:qa", {}), ("bert", {})])
def test_a_frankenmerge_takes_the_norms_after_the_layers_from_its_last_slice(family, extra, tmp_path):
    """Passthrough slices of two models: the norms before the first layer (over the embeddings) come from the
    first slice's model, those after the last layer (``after_layers``, as mergekit's post-weights) from the last's."""
    import yaml

    import seme

    paths = [tmp_path / "first", tmp_path / "last"]
    for seed, path in enumerate(paths):
        model = perturbed(build(family, extra))
        with torch.no_grad():
            for t in model.state_dict().values():
                t.add_(seed) if t.is_floating_point() else None
        model.save_pretrained(path)
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(paths[0]), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(paths[1]), "layer_range": [1, 2]}]}]}
    seme.merge(yaml.safe_dump(recipe), str(tmp_path / "merged"), progress=False)
    merged = safetensors_torch.load_file(tmp_path / "merged" / "model.safetensors")
    first, last = (safetensors_torch.load_file(p / "model.safetensors") for p in paths)
    arch = for_config(json.loads((paths[0] / "config.json").read_text()))
    roles = {n: arch.role(n) for n in merged}
    loose_norms = {n: r for n, r in roles.items()
                   if r and r.layer is None and r.role in ("norm", "norm_bias", "final_norm", "final_norm_bias")}
    assert any(r.role in ("norm", "norm_bias") for r in loose_norms.values()), loose_norms
    for name, role in loose_norms.items():
        source = last if role.after_layers or role.role.startswith("final_norm") else first
        assert torch.equal(merged[name], source[name]), name


def test_mllamas_listed_layers_follow_a_slice_merge(tmp_path):
    """Slices that repeat Mllama's cross-attention layer: the config's cross_attention_layers lists the output's
    layers that are cross-attention layers of their model, so the output reloads, runs with image features and
    generates."""
    merged, info, _ = merged_with_a_repeated_layer("mllama", tmp_path, tuned=2)
    assert merged.config.cross_attention_layers == [1, 2] and merged.config.num_hidden_layers == 3
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.isfinite(merged(torch.arange(3, 11).unsqueeze(0), **FORWARD_INPUTS["mllama"]()).logits).all()
    assert merged.generate(torch.arange(3, 6).unsqueeze(0), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize("source", ["base", "union", "model"])
def test_a_table_with_rows_past_the_vocabulary_is_not_remapped(tmp_path, source):
    # Mllama's embedding has vocab_size + 8 rows (its image token is id vocab_size): re-mapping knows the tokens
    # below vocab_size only, and wrote a table of those rows, which transformers cannot load
    import yaml

    import seme
    from conftest import save_tokenizer
    from seme.errors import SemeError
    from test_vocabulary import renumbered

    model = build("mllama", {})
    paths = [str(tmp_path / "base"), str(tmp_path / "tuned")]
    for p in paths:
        model.save_pretrained(p)
        save_tokenizer(p, model.config.vocab_size)
    paths[1] = renumbered(paths[1], tmp_path / "renumbered")
    recipe = {"merge_method": "linear", "tokenizer_source": paths[1] if source == "model" else source,
              "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths]}
    with pytest.raises(SemeError, match=re.escape("tensor 'model.embed_tokens.weight' of base has 136 rows, more "
                                                  "than its vocab_size (128)")):
        seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_mobilebert_head_columns_follow_a_vocabulary_remap(tmp_path):
    """MobileBERT's head scores the head coordinates past the tied embeddings' width with a column per token
    (cls.predictions.dense, a token_table laid out in_out): merged with a copy of itself whose tokens w1 and w2 swapped
    ids, onto the base's vocabulary, the model comes back as it was, those columns included."""
    import yaml

    import seme
    from conftest import save_tokenizer
    from test_vocabulary import renumbered

    model = perturbed(build("mobilebert:mlm", {}))
    base = tmp_path / "base"
    model.save_pretrained(base)
    save_tokenizer(base, model.config.vocab_size)
    swapped = Path(renumbered(str(base), tmp_path / "swapped"))  # its rows: the word embeddings, the head's bias
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    i, j = vocab["w1"], vocab["w2"]
    state = safetensors_torch.load_file(swapped / "model.safetensors")
    columns = state["cls.predictions.dense.weight"]
    columns[:, [i, j]] = columns[:, [j, i]].clone()
    safetensors_torch.save_file(state, swapped / "model.safetensors", metadata={"format": "pt"})
    recipe = {"merge_method": "linear", "base_model": str(base), "tokenizer_source": "base", "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (base, swapped)]}
    seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)
    merged = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    expected = safetensors_torch.load_file(base / "model.safetensors")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)


def test_a_layer_of_its_own_stays_in_place(tmp_path):
    # ModernBERT's first layer has no attention norm: slices that move it, or move another layer into its place,
    # would give transformers a norm it ignores or lacks
    import yaml

    import seme
    from seme.errors import SemeError

    path = tmp_path / "model"
    perturbed(build("modernbert", {})).save_pretrained(path)
    for ranges, message in [([[1, 2], [0, 2]], "slices put layer 1 at layer 0"),
                            ([[0, 1], [0, 2]], "slices put layer 0 at layer 1")]:
        recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(path), "layer_range": r}]}
                                                            for r in ranges]}
        with pytest.raises(SemeError, match=message + ".*modernbert's layer 0 has tensors unlike the others'"):
            seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)
    recipe["slices"] = [{"sources": [{"model": str(path), "layer_range": [0, 2]}]},
                        {"sources": [{"model": str(path), "layer_range": [1, 2]}]}]  # layer 0 in place: merges
    seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("family", ["gemma4_assistant", "gemma4_assistant:gemma4_unified_assistant"])
def test_gemma4_assistants_merge_and_are_refused_rotation(family, tmp_path):
    """Fine-tunes of one Gemma 4 drafter merged by task_arithmetic and by SeMe (unturned: they are aligned) reload in
    transformers and draft a token from a target's states, the permutation of token ids into clusters copied; a copy
    turned by the role table is refused rotation, naming the target whose coordinates no turn of its own changes."""
    import seme
    from seme.errors import SemeError

    extra = {"use_ordered_embeddings": True, "num_centroids": 8, "centroid_intermediate_top_k": 2}
    base = perturbed(build(family, extra))
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        tuned = build(family, extra)
        tuned.load_state_dict({k: v + 0.0005 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
        tuned.save_pretrained(tmp_path / f"tuned{i}")
    tuned = [{"model": str(tmp_path / f"tuned{i}")} for i in range(2)]
    ordering = safetensors_torch.load_file(tmp_path / "base" / "model.safetensors")["masked_embedding.token_ordering"]
    for method in ("task_arithmetic", "seme"):
        parameters = {"parameters": {"weight": 0.5}} if method == "task_arithmetic" else {}
        seme.merge({"merge_method": method, "base_model": str(tmp_path / "base"), "models": tuned, "dtype": "float32",
                    **parameters}, str(tmp_path / method), progress=False)
        merged, info = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / method,
                                                                                   output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.equal(merged.masked_embedding.token_ordering, ordering)
        with torch.no_grad():
            out = merged.eval()(**FORWARD_INPUTS["gemma4_assistant"]())
        assert out.logits.shape == (1, 1, 128) and out.last_hidden_state.shape == (1, 1, 48)
        assert torch.isfinite(out.logits).all()

    config = json.loads((tmp_path / "base" / "config.json").read_text())
    state = {k: v.double() if v.is_floating_point() else v
             for k, v in safetensors_torch.load_file(tmp_path / "base" / "model.safetensors").items()}
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    (tmp_path / "turned").mkdir()
    safetensors_torch.save_file({k: v.float() if v.is_floating_point() else v
                                 for k, v in rotate(state, for_config(config), Q).items()},
                                tmp_path / "turned" / "model.safetensors")
    (tmp_path / "turned" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SemeError, match=r"by rotation is not supported \(.*it drafts for a target model"):
        seme.merge({"merge_method": "seme", "base_model": str(tmp_path / "base"), "dtype": "float32",
                    "models": [{"model": str(tmp_path / "turned")}]}, str(tmp_path / "refused"), progress=False)


def test_qwen4_exp_merges_and_is_refused_rotation(tmp_path):
    """Fine-tunes of one Qwen4-Exp merged by task_arithmetic and by SeMe (unturned: they are aligned) reload in
    transformers with every tensor (the n-gram tables from their shards, the hash constants copied); an independent
    model, which only a turn would align, is refused: no turn commutes with its hyper-connections."""
    import seme
    from seme.errors import SemeError

    base = perturbed(build("qwen4_exp_text", {}))
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        tuned = build("qwen4_exp_text", {})
        tuned.load_state_dict({k: v + 0.0005 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
        tuned.save_pretrained(tmp_path / f"tuned{i}")
    tuned = [{"model": str(tmp_path / f"tuned{i}")} for i in range(2)]
    for method in ("task_arithmetic", "seme"):
        parameters = {"parameters": {"weight": 0.5}} if method == "task_arithmetic" else {}
        seme.merge({"merge_method": method, "base_model": str(tmp_path / "base"), "models": tuned, "dtype": "float32",
                    **parameters}, str(tmp_path / method), progress=False)
        merged, info = transformers.Qwen4ExpForCausalLM.from_pretrained(tmp_path / method, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.equal(merged.model.layers[0].ple.ple_embedding.layer_multipliers,
                           base.model.layers[0].ple.ple_embedding.layer_multipliers)
        with torch.no_grad():
            assert torch.isfinite(merged.eval()(torch.arange(3, 11).unsqueeze(0)).logits).all()
    torch.manual_seed(5)
    transformers.Qwen4ExpForCausalLM(transformers.Qwen4ExpTextConfig(**QWEN4_EXP)).save_pretrained(
        tmp_path / "independent")
    with pytest.raises(SemeError, match=r"^SeMe: aligning qwen4_exp_text models by rotation is not supported \(its "
                                        r"hyper-connections gate"):
        seme.merge({"merge_method": "seme", "base_model": str(tmp_path / "base"), "dtype": "float32",
                    "models": [{"model": str(tmp_path / "independent")}]}, str(tmp_path / "refused"), progress=False)


@pytest.mark.parametrize("family, refusal", [
    ("inkling_text", r"by rotation is not supported \(.*depthwise causal convolutions"),
    # its attention-residual queries, kept outside the layers by index, are stacks of their own to seme.plan
    ("inkling2_text", r"has several layer stacks \(model\.llm\.attn_res\.attn_queries\.\* \(1 layers\)"),
])
def test_inkling_merges_and_is_refused_rotation(family, refusal, tmp_path):
    """Fine-tunes of one Inkling (or Inkling 2, saved in its checkpoints' layout) merged by task_arithmetic reload in
    transformers with every tensor and generate; SeMe refuses in one line a copy turned by the role table: Inkling's
    for the convolutions over the stream, Inkling 2's for its several stacks."""
    import seme
    from seme.errors import SemeError

    base = perturbed(build(family, {}))
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        tuned = build(family, {})
        tuned.load_state_dict({k: v + 0.0005 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        tuned.save_pretrained(tmp_path / f"tuned{i}")
    tuned = [{"model": str(tmp_path / f"tuned{i}")} for i in range(2)]
    seme.merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "models": tuned,
                "dtype": "float32", "parameters": {"weight": 0.5}}, str(tmp_path / "merged"), progress=False)
    merged, info = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "merged",
                                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert merged.eval().generate(torch.arange(3, 11)[None], max_new_tokens=3, do_sample=False).shape == (1, 11)

    config = json.loads((tmp_path / "base" / "config.json").read_text())
    state = {k: v.double() for k, v in safetensors_torch.load_file(tmp_path / "base" / "model.safetensors").items()}
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    (tmp_path / "turned").mkdir()
    safetensors_torch.save_file({k: v.float() for k, v in rotate(state, for_config(config), Q).items()},
                                tmp_path / "turned" / "model.safetensors")
    (tmp_path / "turned" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SemeError, match=refusal) as refused:
        seme.merge({"merge_method": "seme", "base_model": str(tmp_path / "base"), "dtype": "float32",
                    "models": [{"model": str(tmp_path / "turned")}]}, str(tmp_path / "refused"), progress=False)
    assert "\n" not in str(refused.value)


def test_inkling2_attention_residual_queries_read_the_normalised_block_states(saved):
    """Inkling 2's attention-residual queries (reads without a norm) attend over states of the residual stream: each
    block state is the embeddings or a layer's output, the partial one the stream where the sublayer reads it; they
    normalise them without a gain, so a turn of the stream turns them as it turns any read's rows."""
    model, config, shapes = saved("inkling2_text", {})
    arch = for_config(config)
    queries = [n for n in shapes if n.startswith("model.llm.attn_res.")]
    assert queries and all(arch.role(n).role == "read" and arch.role(n).norm is None for n in queries)
    attentions = {n: m for n, m in model.named_modules() if n.endswith(("attention_input", "mlp_input", "final_input"))}
    assert len(attentions) == len(queries)
    states, stacks = [], {}
    handles = [model.model.embed_tokens.register_forward_hook(lambda _, args, out: states.append(out))]
    handles += [layer.register_forward_hook(lambda _, args, out: states.append(out)) for layer in model.model.layers]
    handles += [m.register_forward_hook(lambda m, args, out, n=n: stacks.update({n: args}) if n not in stacks else None)
                for n, m in attentions.items()]
    with torch.no_grad():
        model(torch.arange(8).unsqueeze(0))
    for h in handles:
        h.remove()
    assert stacks.keys() == attentions.keys()
    for name, (blocks, partial) in stacks.items():
        assert blocks.shape[-2] >= 1 and partial.shape == states[0].shape, name
        for j in range(blocks.shape[-2]):
            assert any(torch.allclose(blocks[..., j, :].float(), s.float()) for s in states), (name, j)


def test_phi4_multimodal_merges_end_to_end(tmp_path):
    """Phi-4-multimodal's fine-tunes merged by task_arithmetic: whole (its image tower's layers a stack of their
    own), and module by module with its decoder's layers sliced (0, 1, 1), which leaves the image tower's depth as it
    was; each output reloads in transformers and generates from a prompt with an image and a sound. SeMe turns a
    turned copy back, its embedders' writes with its stream."""
    import yaml

    import seme

    base = perturbed(build("phi4_multimodal", {}))
    paths = [tmp_path / "base"] + [tmp_path / f"tuned{i}" for i in range(2)]
    base.save_pretrained(paths[0])
    g = torch.Generator().manual_seed(3)
    for path in paths[1:]:
        tuned = build("phi4_multimodal", {})
        tuned.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        tuned.save_pretrained(path)
    weighted = lambda **source: [{"model": str(p), **source, **({} if p == paths[0] else {
        "parameters": {"weight": 0.5}})} for p in paths]
    method = {"merge_method": "task_arithmetic", "base_model": str(paths[0]), "dtype": "float32"}
    whole = {**method, "models": weighted()}
    sliced = {**method, "modules": {
        "text_decoder": {"slices": [{"sources": weighted(layer_range=[0, 2])},
                                    {"sources": weighted(layer_range=[1, 2])}]},
        **{part: {"models": weighted()} for part in ("vision_tower", "audio_tower", "multi_modal_projector")}}}
    prompt = FORWARD_INPUTS["phi4_multimodal"]()
    for name, recipe, depth in (("whole", whole, 2), ("sliced", sliced, 3)):
        seme.merge(yaml.safe_dump(recipe), str(tmp_path / name), progress=False)
        merged, info = transformers.Phi4MultimodalForCausalLM.from_pretrained(tmp_path / name,
                                                                               output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert merged.config.num_hidden_layers == depth and merged.config.vision_config.num_hidden_layers == 2
        out = merged.generate(**prompt, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, prompt["input_ids"].shape[1] + 3)

    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    original = safetensors_torch.load_file(paths[0] / "model.safetensors")
    arch = for_config(json.loads((paths[0] / "config.json").read_text()))
    (tmp_path / "turned").mkdir()
    turned = rotate({k: v.double() for k, v in original.items()}, arch, Q)
    safetensors_torch.save_file({k: v.float() for k, v in turned.items()}, tmp_path / "turned" / "model.safetensors")
    (tmp_path / "turned" / "config.json").write_text((paths[0] / "config.json").read_text())
    seme.merge({"merge_method": "seme", "base_model": str(paths[0]), "models": [{"model": str(tmp_path / "turned")}],
                "dtype": "float32"}, str(tmp_path / "seme"), progress=False)
    assert json.loads((tmp_path / "seme" / "seme_report.json").read_text())["sources"][0]["applied"]
    merged = safetensors_torch.load_file(tmp_path / "seme" / "model.safetensors")
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


def test_chameleon_merges_end_to_end(tmp_path):
    """Chameleon's fine-tunes merged by task_arithmetic over slices that repeat layer 1: the output reloads at its
    new depth, its VQ-VAE (no layers of the decoder) merged whole, and generates. SeMe turns a turned copy back, its
    VQ-VAE untouched; with swin_norm it refuses, in one line."""
    import yaml

    import seme
    from seme.errors import SemeError

    merged, info, state = merged_with_a_repeated_layer("chameleon", tmp_path / "sliced", tuned=2)
    assert merged.config.num_hidden_layers == 3 and not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any(".layers.2." in n for n in state if ".vqmodel." in n)
    assert merged.generate(torch.arange(3, 6).unsqueeze(0), max_new_tokens=3, do_sample=False).shape == (1, 6)

    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for variant, extra in (("plain", {}), ("swin", {"swin_norm": True})):
        base = tmp_path / variant / "base"
        perturbed(build("chameleon", extra)).save_pretrained(base)
        original = safetensors_torch.load_file(base / "model.safetensors")
        arch = for_config(json.loads((base / "config.json").read_text()))
        (tmp_path / variant / "turned").mkdir()
        turned = rotate({k: v.double() for k, v in original.items()}, arch, Q)
        safetensors_torch.save_file({k: v.float() for k, v in turned.items()},
                                    tmp_path / variant / "turned" / "model.safetensors")
        (tmp_path / variant / "turned" / "config.json").write_text((base / "config.json").read_text())
        recipe = yaml.safe_dump({"merge_method": "seme", "base_model": str(base), "dtype": "float32",
                                 "models": [{"model": str(tmp_path / variant / "turned")}]})
        if variant == "swin":
            with pytest.raises(SemeError, match=r"^SeMe: aligning chameleon \(swin_norm=true\) models by rotation is not "
                                                r"supported \(its sublayer outputs are normalised[^\n]*$"):
                seme.merge(recipe, str(tmp_path / variant / "seme"), progress=False)
            continue
        seme.merge(recipe, str(tmp_path / variant / "seme"), progress=False)
        assert json.loads((tmp_path / variant / "seme" / "seme_report.json").read_text())["sources"][0]["applied"]
        merged = safetensors_torch.load_file(tmp_path / variant / "seme" / "model.safetensors")
        assert merged.keys() == original.keys()
        for name, tensor in original.items():
            torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
