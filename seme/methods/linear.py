"""Linear (weighted average) merge, "model soups" (https://arxiv.org/abs/2203.05482)."""
from __future__ import annotations

import torch

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import INPUT, Method, Param, register


def linear(inputs: Inputs, p: dict) -> torch.Tensor:
    dtype = compute_dtype(inputs.tensors[0])
    out = torch.zeros_like(inputs.tensors[0], dtype=dtype)
    for tensor, w in zip(inputs.tensors, p["weight"]):
        out.add_(tensor.to(dtype), alpha=w)
    if p["normalize"]:
        out.div_(sum(p["weight"]))
    return out


register(Method("linear", linear, (
    Param("weight", float, INPUT),
    Param("normalize", bool, default=True),
), reference="https://arxiv.org/abs/2203.05482"))
