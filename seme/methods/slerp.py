"""Spherical interpolation: SLERP (base + one model) and NuSLERP (two models, optionally around a base)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import NON_BASE, Method, Param, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP between two tensors seen as single flat vectors; linear when (anti)collinear."""
    import torch

    dtype = compute_dtype(v0)
    a, b = v0.to(dtype), v1.to(dtype)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na = na if na > _NORM_EPS else 1.0
    nb = nb if nb > _NORM_EPS else 1.0
    dot = min(max(float(torch.sum((a / na) * (b / nb))), -1.0), 1.0)
    if abs(dot) > _DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b


def slerp(inputs: Inputs, p: dict) -> torch.Tensor:
    (other,) = inputs.others
    return slerp_flat(p["t"], inputs.base, other)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP of each row (or column, or the flattened tensor); linear where rows are collinear."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= _NORM_EPS**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(inputs: Inputs, p: dict) -> torch.Tensor:
    w0, w1 = p["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    dtype = compute_dtype(inputs.tensors[0])
    x0, x1 = (x.to(dtype) for x in inputs.others)
    row_wise, flatten = p["nuslerp_row_wise"], p["nuslerp_flatten"]
    if inputs.base is None:
        return nuslerp_vectors(t, x0, x1, row_wise, flatten)
    base = inputs.base.to(dtype)
    return base + nuslerp_vectors(t, x0 - base, x1 - base, row_wise, flatten)


register(Method("slerp", slerp, (Param("t", float),), base="required", min_inputs=2, max_inputs=2,
                reference="https://en.wikipedia.org/wiki/Slerp"))
register(Method("nuslerp", nuslerp, (
    Param("weight", float, NON_BASE),
    Param("nuslerp_row_wise", bool, default=False),
    Param("nuslerp_flatten", bool, default=True),
), base="optional", min_non_base=2, max_non_base=2))
