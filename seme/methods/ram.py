"""Reinforced Agent Merging (RAM, https://arxiv.org/abs/2601.13572) and its tensor-local RAM+.

An element of a task vector counts where |delta| > epsilon. Where one model changed an element it
keeps its whole change; where several did, their changes are averaged over those models (not
diluted by the ones that left it alone). RAM+ also scales each model's unique changes by
1 + r * clamp(shared_i / unique_i, 0, alpha), its count of shared over unique changed elements in
the tensor, so that a model whose changes are mostly shared gives more weight to those it alone made.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import Method, Param, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


def _changes(inputs: Inputs, epsilon: float):
    """(base, each model's delta with its uncounted elements zeroed, whether each element counts,
    how many models change each element), in the compute dtype."""
    import torch

    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    deltas = torch.stack([x.to(dtype) - base for x in inputs.others])
    counted = deltas.abs() > epsilon
    return base, deltas * counted, counted, counted.sum(dim=0)


def _sum(terms: torch.Tensor) -> torch.Tensor:
    """Σ over the models, one after the other from 0, as the fused kernel adds them (torch's sum over
    the first dimension changes its order from 5 models on, with the tensor's size)."""
    import torch

    total = torch.zeros_like(terms[0])
    for term in terms:
        total += term
    return total


def ram(inputs: Inputs, p: dict) -> torch.Tensor:
    if not inputs.others:
        return inputs.base.to(compute_dtype(inputs.base))
    base, deltas, _, count = _changes(inputs, p["epsilon"])
    return base + _sum(deltas / count.clamp(min=1))


def ramplus_tl(inputs: Inputs, p: dict) -> torch.Tensor:
    import torch

    if not inputs.others:
        return inputs.base.to(compute_dtype(inputs.base))
    base, deltas, counted, count = _changes(inputs, p["epsilon"])
    unique = count == 1
    per_model = (len(deltas), -1)  # not flatten(1): a 0-d tensor's deltas have no dimension 1
    unique_counts = (counted & unique).reshape(per_model).sum(dim=1)
    shared_counts = (counted & ~unique).reshape(per_model).sum(dim=1)  # count 0 is never counted
    # a model without unique changes has no element to scale: its ratio is moot (mergekit: shared / epsilon)
    ratio = shared_counts / unique_counts.clamp(min=1).to(deltas.dtype)
    scale = (1 + p["r"] * ratio.clamp(min=0, max=p["alpha"])).to(deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    return base + _sum(torch.where(unique, deltas * scale, deltas / count.clamp(min=1)))


EPSILON = Param("epsilon", float, default=1e-5, minimum=0.0)
register(Method("ram", ram, (EPSILON,), base="required", peak_buffers=(2.0, 4.0),
                reference="https://arxiv.org/abs/2601.13572"))
register(Method("ramplus_tl", ramplus_tl, (Param("r", float, default=0.1, minimum=0.0),
                                           Param("alpha", float, default=0.2, minimum=0.0), EPSILON),
                base="required", peak_buffers=(3.0, 4.0), reference="https://arxiv.org/abs/2601.13572"))
