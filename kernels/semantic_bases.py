"""Triton kernel of the semantic basis norms (METHOD §1) for CUDA tensors (CPU tensors under
TRITON_INTERPRET=1): `basis_norms(W, inverse)` = |w_i G⁻¹| for every row of the head W.

A matrix product with its epilogue fused: each program owns BM rows of W, walks the columns of
G⁻¹ BN at a time, forms that [BM, BN] tile of S = W G⁻¹ in registers (a tiled product over d) and
adds its squares to a per-row sum. No tile of S is ever written, so the [V, d] bases (2 GB for a
128k × 4096 head in fp32), or the block-by-block products the torch path holds, never exist.
Products run as "tf32x3" (three tf32 tensor-core products: fp32 accuracy, about 1e-6 relative, at
several times the speed of fp32 FMAs; ignored where there are no tensor cores): one tf32 product would
move a cosine by about 1e-3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BM, BN, BK, WARPS, STAGES = 128, 64, 32, 4, 4  # the fastest of 7 shapes tried on an H100


@triton.jit
def _norms_kernel(w_ptr, inv_ptr, out_ptr, V, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < V
    squares = tl.zeros([BM], tl.float32)
    for n0 in range(0, D, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < D
        tile = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, D, BK):
            dims = k0 + tl.arange(0, BK)
            dim_ok = dims < D
            w = tl.load(w_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            g = tl.load(inv_ptr + dims[:, None] * D + cols[None, :], mask=dim_ok[:, None] & col_ok[None, :],
                        other=0.0)
            tile = tl.dot(w, g, tile, input_precision="tf32x3")
        squares += tl.sum(tile * tile, 1)
    tl.store(out_ptr + rows, tl.sqrt(squares), mask=row_ok)


def basis_norms(W: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """|w_i G⁻¹| (float32, [V]) for a head W [V, d] and G⁻¹ [d, d] (float32)."""
    V, D = W.shape
    if inverse.shape != (D, D):
        raise ValueError(f"G⁻¹ must be [{D}, {D}] for a head of width {D}, got {list(inverse.shape)}")
    W = W.to(torch.float32).contiguous()
    inverse = inverse.to(torch.float32).contiguous()
    out = torch.empty(V, dtype=torch.float32, device=W.device)
    if V:
        _norms_kernel[(triton.cdiv(V, BM),)](W, inverse, out, V, D, BM=BM, BN=BN, BK=BK, num_warps=WARPS,
                                             num_stages=STAGES)
    return out
