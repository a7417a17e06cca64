"""Model Stock (https://arxiv.org/abs/2403.19522): interpolate between the base and the average of
the fine-tunes by a ratio derived from the angle between their task vectors."""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import Method, Param, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

_SINGULAR = 1e-6


def model_stock(inputs: Inputs, p: dict) -> torch.Tensor:
    import torch

    dtype = compute_dtype(inputs.base)
    shape = inputs.base.shape
    if p["filter_wise"]:
        w0 = inputs.base.to(dtype).reshape(shape[0] if inputs.base.dim() > 1 else 1, -1)
    else:
        w0 = inputs.base.to(dtype).reshape(-1)
    ws = [x.to(dtype).reshape(w0.shape) for x in inputs.others]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def interpolation_ratio(cosine: float, n: int) -> float:
    """Model Stock's t = n cos / (1 + (n - 1) cos) for the mean cosine of n task vectors; at the
    singularity there is no finite estimate: 0, the base (the fused kernel shares this rule)."""
    denominator = 1 + (n - 1) * cosine
    return 0.0 if abs(denominator) < _SINGULAR else n * cosine / denominator


register(Method("model_stock", model_stock, (Param("filter_wise", bool, default=False),), base="required",
                min_inputs=3, peak_buffers=(3.0, 2.0), reference="https://arxiv.org/abs/2403.19522"))
