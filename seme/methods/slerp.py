"""Spherical interpolation and means: SLERP (base + one model), NuSLERP (two models, optionally
around a base), Multi-SLERP (any number, in the tangent space of their mean) and the Karcher mean."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from seme.errors import SemeError
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
    c0, c1 = slerp_coefficients(t, float(torch.sum((a / na) * (b / nb))))
    return c0 * a + c1 * b


def slerp_coefficients(t: float, cosine: float) -> tuple[float, float]:
    """(c0, c1) of SLERP's c0 a + c1 b for the cosine of a and b: linear when (anti)collinear (the
    fused kernel computes the cosine its own way and shares this rule)."""
    dot = min(max(cosine, -1.0), 1.0)
    if abs(dot) > _DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


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


def multislerp(inputs: Inputs, p: dict) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere, as mergekit 0.1.5's `multislerp`: the (base-
    relative) tensors are projected to the unit sphere, mixed in the tangent space at their weighted
    mean direction, mapped back with the exponential map and scaled by their weighted mean norm."""
    import torch

    others = inputs.others
    if len(others) == 1:
        return others[0].to(compute_dtype(others[0]))
    dtype = compute_dtype(others[0])
    eps = p["eps"]
    base = None if inputs.base is None else inputs.base.to(dtype)
    x = torch.stack([t.to(dtype) for t in others])
    if base is not None:
        x -= base
    flat = x.view(len(others), -1)
    weights = torch.tensor(p["weight"], dtype=dtype)
    if p["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise SemeError(f"multislerp: the weighted sum of the directions of '{inputs.name}' is zero "
                            f"(opposite tensors with balancing weights): change the weights")
        out = (x[0] * weights[0] + x[1] * weights[1]).view(x.shape[1:])  # mergekit's fallback: linear
        return out if base is None else out + base
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(x.shape[1:])
    return out if base is None else out + base


def karcher(inputs: Inputs, p: dict) -> torch.Tensor:
    """The equally weighted Karcher (Riemannian) mean of the inputs' directions on the unit sphere,
    by fixed-point iteration, scaled by their mean norm: mergekit 0.1.5's `karcher`, step for step."""
    import torch

    dtype = compute_dtype(inputs.tensors[0])
    tensors = [t.to(dtype) for t in inputs.tensors]
    if len(tensors) == 1:
        return tensors[0]
    max_iter, tol = p["max_iter"], p["tol"]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    units = [tensors[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


register(Method("slerp", slerp, (Param("t", float),), base="required", min_inputs=2, max_inputs=2,
                peak_buffers=(2.0, 2.0), reference="https://en.wikipedia.org/wiki/Slerp"))
register(Method("nuslerp", nuslerp, (
    Param("weight", float, NON_BASE),
    Param("nuslerp_row_wise", bool, default=False),
    Param("nuslerp_flatten", bool, default=True),
), base="optional", min_non_base=2, max_non_base=2, peak_buffers=(3.0, 3.0)))
def _check_multislerp(p: dict) -> str | None:
    # one tensor is returned as it is, its weight unused
    if p["normalize_weights"] and len(p["weight"]) > 1 and abs(sum(p["weight"])) < 1e-12:
        return "multislerp weights sum to 0, so they cannot be normalised"
    return None


register(Method("multislerp", multislerp, (
    Param("weight", float, NON_BASE),
    Param("normalize_weights", bool, default=True),
    Param("eps", float, default=1e-8, minimum=0.0),
), base="optional", min_non_base=1, peak_buffers=(2.0, 4.0),
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", check=_check_multislerp))
register(Method("karcher", karcher, (
    Param("max_iter", int, default=10, minimum=0),
    Param("tol", float, default=1e-5, minimum=0.0),
), peak_buffers=(5.5, 2.0), reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean"))
