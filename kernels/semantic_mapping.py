"""Triton kernel of the cosine-to-probability semantic mapping (METHOD §2) for CUDA tensors (CPU
tensors under TRITON_INTERPRET=1): `semantic_mix(queries, keys, values, temperature, mode)` has
the contract of `seme.semantic.mapping.semantic_mix` without `topk`.

The flash-attention structure with Q = unit queries [B, d_k], K = unit bases [V, d_k] and
V = a second basis set [V, d_v]: each program owns BQ queries and BD output columns, walks the
vocabulary BV bases at a time, takes the cosines as a tiled product over d_k, keeps a running max
and sum (softmax mode) and accumulates p @ values; no [B, V] matrix exists. Hidden sizes are far
larger than attention heads, so the output columns are split across programs and each recomputes
the cosines of its queries (d_v / BD times in all). Products run in full fp32 ("ieee"): at
T = 0.05 a tf32 cosine error of 1e-3 would move a probability by 2%.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BQ, BV, BK, BD = 16, 64, 64, 64


@triton.jit
def _mix_kernel(q_ptr, k_ptr, v_ptr, out_ptr, B, V, DK, DV, inv_t, SOFTMAX: tl.constexpr, BQ: tl.constexpr,
                BV: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok = rows < B
    col_ok = cols < DV
    m = tl.full([BQ], -float("inf"), tl.float32)
    denom = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BD], tl.float32)
    for start in range(0, V, BV):
        vocab = start + tl.arange(0, BV)
        vocab_ok = vocab < V
        scores = tl.zeros([BQ, BV], tl.float32)
        for kk in range(0, DK, BK):
            dims = kk + tl.arange(0, BK)
            dim_ok = dims < DK
            q = tl.load(q_ptr + rows[:, None] * DK + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            k = tl.load(k_ptr + vocab[:, None] * DK + dims[None, :], mask=vocab_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            scores = tl.dot(q, tl.trans(k), scores, input_precision="ieee")
        values = tl.load(v_ptr + vocab[:, None] * DV + cols[None, :], mask=vocab_ok[:, None] & col_ok[None, :],
                         other=0.0)
        if SOFTMAX:
            logits = tl.where(vocab_ok[None, :], scores * inv_t, -float("inf"))
            m_new = tl.maximum(m, tl.max(logits, 1))
            scale = tl.exp(m - m_new)
            p = tl.exp(logits - m_new[:, None])
            denom = denom * scale + tl.sum(p, 1)
            acc = acc * scale[:, None]
            m = m_new
        else:  # linear: the cosines themselves (zero past V: masked keys load as 0)
            p = scores
        acc = tl.dot(p, values, acc, input_precision="ieee")
    if SOFTMAX:
        acc = acc / denom[:, None]
    tl.store(out_ptr + rows[:, None] * DV + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def semantic_mix(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, temperature: float = 0.05,
                 mode: str = "softmax") -> torch.Tensor:
    """Σ_i p_i(q) values_i for each query row (normalised here); keys are unit rows [V, d_k], values [V, d_v]."""
    if mode not in ("softmax", "linear"):
        raise ValueError(f"unknown mapping mode {mode!r}")
    q = queries.to(torch.float32)
    q = (q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)).contiguous()
    keys = keys.to(torch.float32).contiguous()
    values = values.to(torch.float32).contiguous()
    (B, DK), (V, DV) = q.shape, values.shape
    if keys.shape != (V, DK):
        raise ValueError(f"keys must be [{V}, {DK}], got {list(keys.shape)}")
    out = torch.empty(B, DV, dtype=torch.float32, device=q.device)
    if B and DV:
        grid = (triton.cdiv(B, BQ), triton.cdiv(DV, BD))
        _mix_kernel[grid](q, keys, values, out, B, V, DK, DV, 1.0 / temperature, SOFTMAX=mode == "softmax",
                          BQ=BQ, BV=BV, BK=BK, BD=BD)
    return out
