"""`python -m seme.merge --demo`: a complete merge on tiny models built on the spot (no downloads).

A tiny Llama "base" and two "fine-tunes" (the base plus small, partly conflicting task vectors)
are written as Hugging Face folders; a TIES recipe merges them; the result is reloaded with
transformers and generates a few tokens.
"""
from __future__ import annotations

import os
import sys

RECIPE = """\
merge_method: ties
base_model: base
models:
  - model: expert_a
    parameters: {{weight: 1.0, density: 0.5}}
  - model: expert_b
    parameters: {{weight: [0.6, 1.0], density: 0.5}}   # a gradient over the layers
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
random_seed: {seed}
"""


def build_tiny_llama(path: str, seed: int, hidden: int = 64, layers: int = 4, vocab: int = 256,
                     tied: bool = False, base_state: dict | None = None, delta_scale: float = 0.02) -> dict:
    """Save a tiny random Llama at `path`; with `base_state`, a fine-tune-like copy of that base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if base_state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + delta_scale * torch.randn_like(p) * base_state[name].std())
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_demo(out_dir: str, **options) -> None:
    from seme import distributed
    from seme.executor import not_empty
    from seme.io.card import merged_by_seme
    from seme.options import resolve

    options = resolve(**options)  # a bad option is refused before the models are built
    recipe = RECIPE.format(seed=42 if options["random_seed"] is None else options["random_seed"])
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not options.get("overwrite"):
        # only an earlier demo's output (its card quotes this recipe) is rebuilt, never another merge
        if not merged_by_seme(out_dir, recipe):  # refused before the models are built
            raise not_empty(out_dir)
        options["overwrite"] = True
    work = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(out_dir)), ".seme-demo-models"))
    recipe_path = os.path.join(work, "recipe.yml")
    # Under torchrun, rank 0 alone builds the models and speaks: the other ranks would rewrite the
    # files that it reads, and repeat its lines.
    group = distributed.current()
    if group.rank == 0:
        print(f"seme demo: building tiny models in {work}", file=sys.stderr)
        base = build_tiny_llama(os.path.join(work, "base"), seed=0)
        build_tiny_llama(os.path.join(work, "expert_a"), seed=1, base_state=base)
        build_tiny_llama(os.path.join(work, "expert_b"), seed=2, base_state=base)
        with open(recipe_path, "w", encoding="utf-8") as f:
            f.write(recipe)
        print(f"seme demo: recipe {recipe_path}:\n{recipe}", file=sys.stderr)
    if group.world > 1:
        group.agree(None)  # the models are built

    from seme import merge

    merge(recipe_path, out_dir, **options)
    if options.get("dry_run") or group.rank != 0:
        return

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    prompt = torch.tensor([[1, 2, 3, 4]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"seme demo: merged model in {out_dir} reloads ({model.dtype}) and generates: "
          f"{generated[0].tolist()}", file=sys.stderr)
