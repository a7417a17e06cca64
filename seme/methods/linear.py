"""Linear (weighted average) merge, "model soups" (https://arxiv.org/abs/2203.05482)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import INPUT, Method, Param, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


def linear(inputs: Inputs, p: dict) -> torch.Tensor:
    first, *rest = inputs.tensors
    weights = p["weight"]
    out = first.to(compute_dtype(first)) * weights[0]
    for tensor, w in zip(rest, weights[1:]):
        out.add_(tensor, alpha=w)  # half inputs are widened inside the add: no converted copies
    if p["normalize"]:
        out.div_(sum(weights))
    return out


def _check(p: dict) -> str | None:
    if p["normalize"] and abs(sum(p["weight"])) < 1e-12:
        return "linear weights sum to 0, so they cannot be normalised"
    return None


register(Method("linear", linear, (
    Param("weight", float, INPUT),
    Param("normalize", bool, default=True),
), peak_buffers=(2.5, 0.0), reference="https://arxiv.org/abs/2203.05482", check=_check))
