"""Tiny transformers models for the role-table tests of non-decoder families (tests/test_encoder_decoder.py,
tests/test_vision_encoders.py): built from a FAMILIES table of (config class, model class, kwargs), saved once."""
from __future__ import annotations

import json

import torch
import transformers
from safetensors import torch as safetensors_torch


def build(families: dict, key: str, seed: int = 0, **extra):
    """The model of `families[key]` (its kwargs overridden by `extra`), in eval mode, with its gains and biases
    away from 1 / 0, so that a norm's output is told from its input, and its all-zero tensors (class tokens)
    random, so that every tensor differs."""
    config_cls, model_cls, kwargs = families[key]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**kwargs, **extra})).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.ndim == 1 and t.is_floating_point():
                t.mul_(1 + 0.3 * torch.randn(t.shape)).add_(0.1 * torch.randn(t.shape))
            elif t.is_floating_point() and not t.any():
                t.normal_(0, 0.02)
    return model


def save(model, path) -> str:
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path)
    return str(path)


def saved_once(tmp_path_factory, make):
    """A getter: key -> (model, its config.json, {saved tensor name: tensor}), `make(key)` built and saved once."""
    cache = {}

    def get(key):
        if key not in cache:
            model = make(key)
            path = save(model, tmp_path_factory.mktemp(key.replace(":", "-")))
            with open(f"{path}/config.json") as f:
                config = json.load(f)
            cache[key] = model, config, safetensors_torch.load_file(f"{path}/model.safetensors")
        return cache[key]

    return get
