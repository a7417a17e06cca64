"""Triton kernels of the merges that are a weighted sum of the inputs: linear, SLERP, Model Stock (not
filter-wise), RAM and RAM+ (tensor-local) (GPU; CPU under TRITON_INTERPRET=1).

`fused_merge(method, inputs, params, out_dtype)` has the contract of the plain-torch reference
`registry.get(method).fn(inputs, params)` and of `seme.kernels.fused_merge.fused_merge`: inputs float32,
bfloat16 or float16 (mixed dtypes too, each widened to float32 as it is loaded), float32 arithmetic,
the result written straight in out_dtype, rounded to nearest as the reference's cast rounds it. They
follow the C++ CPU kernels (csrc/cpu/fused_merge.cpp) pass for pass, and `seme.fused_merge` computes
the coefficients between the passes on the host:
  linear:      ONE element pass over all the inputs (`_linear_kernel`): Σ_k w_k x_k in model order,
               then / Σ w in one fp32 division when normalised, as the reference does;
  SLERP:       a Gram pass (`_gram_kernel`) gives |base|², |x|² and base·x as per-block float64 partial
               sums, reduced in a fixed order (float64 on the device); the host turns them into the
               two SLERP coefficients (`seme.fused_merge._linear_weights`, the C++ kernel's rule), and
               the linear pass writes c0 base + c1 x;
  Model Stock: the same with the Gram matrix of the task vectors δ_k = x_k − base (their norms and
               pairwise cosines give the ratio t), then (1 − t) base + Σ t/K x_k;
  RAM, RAM+:   RAM+ first counts, per model, its changed elements (|δ_k| > ε) that no other model
               changes and those that others change too (`_ram_counts_kernel`, per-block integer
               counts) for its scale (`seme.fused_merge.ramplus_scales`); then one element pass
               (`_ram_kernel`) adds to the base each counted δ_k, times its scale where it is the only
               change, else divided by the number of models that change the element. RAM's scales are 1.
The δ_k and Gram products are never materialised: each pass recomputes them from the inputs.

Exactness: launches pass enable_fp_fusion=False (no fused multiply-adds), divisions use div_rn. RAM is
bit-equal to its reference; the others agree to fp32 rounding (the reference's torch ops may fuse
multiply-adds, and sum the norms in fp32 where the Gram pass sums in float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seme.fused_merge import TRITON_ONLY_METHODS, _linear_weights, ramplus_scales
from seme.kernels.fused_merge import _OPTS, _OUT_DTYPES, _delta, _store, _upload
from seme.methods import registry
from seme.methods.inputs import Inputs

SUPPORTED = TRITON_ONLY_METHODS
BLOCK = 1024  # elements per program
MAX_ELEMENTS = 2 ** 31  # int32 offsets


def covers(method: str, params: dict) -> bool:
    """Whether these kernels merge `method` with these bound parameters: not Model Stock's filter-wise
    ratios (one per row), which the reference computes."""
    return method in SUPPORTED and not (method == "model_stock" and params["filter_wise"])


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _linear_kernel(xs, w_ptr, out_ptr, n, divisor, K: tl.constexpr, NORMALIZE: tl.constexpr,
                   BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """out = (w_0 x_0 + w_1 x_1 + ... + w_{K-1} x_{K-1}) [/ divisor], left to right, into out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc = tl.load(xs[0] + offs, mask=m, other=0).to(tl.float32) * tl.load(w_ptr)
    for k in tl.static_range(1, K):
        acc = acc + tl.load(w_ptr + k) * tl.load(xs[k] + offs, mask=m, other=0).to(tl.float32)
    if NORMALIZE:
        acc = tl.math.div_rn(acc, divisor)
    _store(out_ptr, offs, acc, m, BF16_BITS)


@triton.jit
def _gram_kernel(xs, b_ptr, partial_ptr, n, nblocks, M: tl.constexpr, DELTAS: tl.constexpr, BLOCK: tl.constexpr):
    """partial[i, j, block] = Σ v_i v_j over the block in float64 (i <= j), the v the fp32 deltas
    x_k − base (DELTAS) or the inputs x_k themselves (b_ptr unused)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if DELTAS:
        base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    vs = ()
    for k in tl.static_range(M):
        if DELTAS:
            vs = vs + (_delta(xs[k], base, offs, m),)
        else:
            vs = vs + (tl.load(xs[k] + offs, mask=m, other=0).to(tl.float32),)
    for i in tl.static_range(M):
        for j in tl.static_range(i, M):
            tl.store(partial_ptr + (i * M + j) * nblocks + pid, tl.sum(vs[i].to(tl.float64) * vs[j].to(tl.float64)))


@triton.jit
def _changes(xs, base, offs, m, epsilon, K: tl.constexpr, BLOCK: tl.constexpr):
    """(the δ_k, how many models change each element: |δ_k| > ε, as fp32)."""
    ds = ()
    count = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(K):
        ds = ds + (_delta(xs[k], base, offs, m),)
        count = count + tl.where(tl.abs(ds[k]) > epsilon, 1.0, 0.0)
    return ds, count


@triton.jit
def _ram_counts_kernel(xs, b_ptr, counts_ptr, n, nblocks, epsilon, K: tl.constexpr, BLOCK: tl.constexpr):
    """counts[0, k, block] = model k's changed elements that no other model changes, counts[1, k, block]
    those that others change too."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    ds, count = _changes(xs, base, offs, m, epsilon, K, BLOCK)
    for k in tl.static_range(K):
        live = (tl.abs(ds[k]) > epsilon) & m
        tl.store(counts_ptr + k * nblocks + pid, tl.sum((live & (count == 1.0)).to(tl.int32)))
        tl.store(counts_ptr + (K + k) * nblocks + pid, tl.sum((live & (count > 1.0)).to(tl.int32)))


@triton.jit
def _ram_kernel(xs, b_ptr, scale_ptr, out_ptr, n, epsilon, K: tl.constexpr, BF16_BITS: tl.constexpr,
                BLOCK: tl.constexpr):
    """out = base + Σ_k (kept δ_k · scale_k where model k alone changes the element, else kept δ_k / max(c, 1)),
    kept δ_k = δ_k · [|δ_k| > ε] (so a NaN δ stays NaN), summed over k from 0, as the reference."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    ds, count = _changes(xs, base, offs, m, epsilon, K, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(K):
        kept = ds[k] * tl.where(tl.abs(ds[k]) > epsilon, 1.0, 0.0)
        acc = acc + tl.where(count == 1.0, kept * tl.load(scale_ptr + k), tl.math.div_rn(kept, tl.maximum(count, 1.0)))
    _store(out_ptr, offs, base + acc, m, BF16_BITS)


# ---------------------------------------------------------------------------------------------------
# Host side


def _linear(xs, weights: list[float], out, normalize: bool = False, divisor: float = 1.0):
    n = out.numel()
    _linear_kernel[(triton.cdiv(n, BLOCK),)](xs, _upload(weights, torch.float32, out.device), out, n, divisor,
                                             K=len(xs), NORMALIZE=normalize, BF16_BITS=out.dtype == torch.int16,
                                             BLOCK=BLOCK, **_OPTS)


def _gram(xs, b, deltas: bool) -> list[list[float]]:
    """The Gram matrix of the task vectors (deltas) or of [base, *xs], summed in float64. The one
    host synchronisation: the coefficients are computed from it on the host."""
    n = b.numel()
    nblocks = triton.cdiv(n, BLOCK)
    vectors = xs if deltas else (b, *xs)
    size = len(vectors)
    partial = torch.zeros(size, size, nblocks, dtype=torch.float64, device=b.device)
    _gram_kernel[(nblocks,)](vectors, b, partial, n, nblocks, M=size, DELTAS=deltas, BLOCK=BLOCK, **_OPTS)
    g = partial.sum(-1)
    g = torch.triu(g) + torch.triu(g, 1).T
    return g.tolist()


def _ram(method: str, p: dict, xs, b, out):
    n, K = b.numel(), len(xs)
    nblocks = triton.cdiv(n, BLOCK)
    scale = [1.0] * K
    if method == "ramplus_tl":
        counts = torch.empty(2, K, nblocks, dtype=torch.int32, device=b.device)
        _ram_counts_kernel[(nblocks,)](xs, b, counts, n, nblocks, p["epsilon"], K=K, BLOCK=BLOCK, **_OPTS)
        unique, shared = counts.sum(-1, dtype=torch.int64).tolist()
        scale = ramplus_scales(unique, shared, p["r"], p["alpha"])
    _ram_kernel[(nblocks,)](xs, b, _upload(scale, torch.float32, b.device), out, n, p["epsilon"], K=K,
                            BF16_BITS=out.dtype == torch.int16, BLOCK=BLOCK, **_OPTS)


def fused_merge(method: str, inputs: Inputs, params: dict, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Merge one tensor like `registry.get(method).fn(inputs, params)`, into `out_dtype`."""
    if not covers(method, params):
        raise ValueError(f"fused_merge: unsupported method {method!r} with {params}")
    if any(t.dtype not in _OUT_DTYPES for t in inputs.tensors):  # float64 is merged in float64: the reference
        return registry.get(method).fn(inputs, params).to(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        return fused_merge(method, inputs, params).to(out_dtype)
    first = inputs.tensors[0] if method == "linear" else inputs.base  # linear has no base
    if method != "linear" and not inputs.others:
        return first.to(out_dtype)
    n = first.numel()
    if n >= MAX_ELEMENTS:
        raise ValueError(f"fused_merge: fewer than {MAX_ELEMENTS} elements (int32 offsets)")
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    if n == 0:
        return out
    target = out.view(torch.int16) if out_dtype == torch.bfloat16 else out
    if method == "linear":
        weights = params["weight"]
        _linear(tuple(t.contiguous() for t in inputs.tensors), weights, target, params["normalize"],
                sum(weights))  # Python's sum, one fp32 division: the reference's
        return out
    b, xs = first.contiguous(), tuple(x.contiguous() for x in inputs.others)
    if method in ("ram", "ramplus_tl"):
        _ram(method, params, xs, b, target)
    else:  # SLERP, Model Stock: the Gram pass, the coefficients on the host, the linear pass
        weights = _linear_weights(method, params, _gram(xs, b, deltas=method == "model_stock"))
        _linear((b, *xs), weights, target)
    return out
