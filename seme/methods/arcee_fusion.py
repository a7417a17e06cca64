"""Arcee Fusion (https://arcee.ai): keep the other model's change only where it matters most. Each
element's importance is |other - base| times the KL divergence of the row's softmax from the base
row's; elements at or above median + 1.5 · IQR of the importances take the other model's value,
the rest keep the base's."""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import Method, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    import torch

    eps = 1e-8
    p = torch.softmax(other, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def quartile_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), each quantile the element at index floor(q (n - 1)) in sorted order,
    found by selection. mergekit 0.1.5 sorts a sample of 10^6 elements, drawn anew on each run,
    when there are more; here the quantiles are always exact (the same for up to 10^6 elements)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    q1, median, q3 = (flat.kthvalue(int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(inputs: Inputs, p: dict) -> torch.Tensor:
    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    (other,) = (x.to(dtype) for x in inputs.others)
    scores = importance(other, base)
    keep = (scores >= quartile_threshold(scores)).to(dtype)
    return base + (other - base) * keep


register(Method("arcee_fusion", arcee_fusion, (), base="required", min_inputs=2, max_inputs=2,
                peak_buffers=(3.0, 2.0), reference="https://arcee.ai"))
