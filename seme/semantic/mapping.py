"""Cosine-to-probability semantic mapping (METHOD §2), block by block over the vocabulary.

For vectors r (rows of `queries`) and unit bases k_i (rows of `keys`):
    softmax mode:  p_i = softmax_i(cos(r, k_i) / T)  (over the top-k cosines when `topk` is set)
    linear mode:   p_i = cos(r, k_i)
and the result is Σ_i p_i v_i for a second basis set `values` (the flash-attention structure:
Q = vectors, K = Ŝ_X, V = Ŝ_Y). No [batch, V] matrix is ever held: an online softmax (running
max and sum) or a running top-k is kept per vector (mean_distribution keeps up to _KEPT_COSINES of
cosines between its two passes). On CUDA tensors with narrow values (d_v up to
`TRITON_MAX_WIDTH`) the softmax and linear modes run as one Triton kernel
(kernels/semantic_mapping.py); it recomputes the cosines once per 64 output columns, so for
hidden-size values the chunked torch code below, whose products go to cuBLAS, stays the default.
"""
from __future__ import annotations

import itertools

import torch

from seme.semantic import memory

_CHUNK = 8192
# Bytes of cosines mean_distribution keeps from its first pass for its second (256 queries: 65536 tokens):
# the drift report's signatures took a third of a small SeMe merge recomputing them.
_KEPT_COSINES = 64 << 20
TRITON_MAX_WIDTH = 256  # at most 4 recomputations of the cosines


def semantic_mix(queries: torch.Tensor, keys, values, *, temperature: float = 0.05, topk: int | None = None,
                 mode: str = "softmax", chunk: int = _CHUNK) -> torch.Tensor:
    """Σ_i p_i(q) values_i for each query row. keys: unit rows [V, d_k], or semantic bases
    (`SemanticBases`: cosines from W and G⁻¹); values: rows [V, d_v], or semantic bases, whose unit
    rows are mixed as Σ_i p_i ŝ_i = (Σ_i p_i w_i / |s_i|) G⁻¹, so no [V, d] bases are formed."""
    if (queries.is_cuda and topk is None and isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
            and values.shape[1] <= TRITON_MAX_WIDTH):
        try:
            from seme.kernels import semantic_mapping
        except ImportError:  # no triton: the torch code runs on the GPU
            pass
        else:
            return semantic_mapping.semantic_mix(queries, keys, values, temperature=temperature, mode=mode)
    if mode not in ("softmax", "linear"):
        raise ValueError(f"unknown mapping mode {mode!r}")
    q = queries.to(torch.float32)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    acc = torch.zeros(q.shape[0], values.shape[1], dtype=torch.float32, device=q.device)
    if mode == "linear":
        for s, cos in _cosine_blocks(q, keys, chunk):
            acc += cos @ _value_rows(values, s, s + cos.shape[1])
        return _finish(values, acc)
    if topk is not None:
        best, idx = semantic_topk(q, keys, topk, chunk=chunk)
        p = torch.softmax(best / temperature, dim=1)
        # the rows of the top tokens, [queries, k, d_v], gathered for a few queries at a time (4096 anchors' top 64
        # of 4096-wide rows: 4 GB at once), an eighth of a block in fp32 (semantic bases' rows take several copies)
        step = max(1, memory.BLOCK_BYTES // (32 * idx.shape[1] * values.shape[1]))
        return _finish(values, torch.cat([torch.einsum("bk,bkd->bd", p[i:i + step], _value_rows(values, index=idx[i:i + step]))
                                          for i in range(0, max(q.shape[0], 1), step)]))
    m = torch.full((q.shape[0], 1), -torch.inf, device=q.device)
    denom = torch.zeros(q.shape[0], 1, device=q.device)
    for s, cos in _cosine_blocks(q, keys, chunk):
        logits = cos / temperature
        m_new = torch.maximum(m, logits.max(dim=1, keepdim=True).values)
        scale = torch.exp(m - m_new)
        e = torch.exp(logits - m_new)
        denom = denom * scale + e.sum(dim=1, keepdim=True)
        acc = acc * scale + e @ _value_rows(values, s, s + cos.shape[1])
        m = m_new
    return _finish(values, acc / denom)


def _value_rows(values, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the values to mix: the rows themselves, or w_i / |s_i| of semantic bases."""
    if isinstance(values, torch.Tensor):
        return values[index] if index is not None else values[start:stop]
    return values.scaled_rows(start, stop, index)


def _finish(values, mixed: torch.Tensor) -> torch.Tensor:
    """Mixed value rows as the mix of the values: semantic bases' mixes still need G⁻¹."""
    return mixed if isinstance(values, torch.Tensor) else values.unproject(mixed)


def semantic_topk(queries: torch.Tensor, keys, k: int, chunk: int = _CHUNK):
    """The k largest cosines of each (unit) query with the keys (unit rows or `SemanticBases`), and
    their token ids."""
    best = torch.full((queries.shape[0], 0), -torch.inf, device=queries.device)
    idx = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for s, scores in _cosine_blocks(queries, keys, chunk):
        # the block's own k best first: the merge with the running ones then concatenates 2k columns, not a
        # block's worth (and its token ids) beside them
        scores, ids = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best, pos = torch.topk(torch.cat([best, scores], dim=1), min(k, best.shape[1] + scores.shape[1]), dim=1)
        idx = torch.gather(torch.cat([idx, ids + s], dim=1), 1, pos)
    return best, idx


def semantic_distribution(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.05,
                          chunk: int = _CHUNK) -> torch.Tensor:
    """The full [batch, V] distribution: for small vocabularies, reports and tests only."""
    q = queries.to(torch.float32)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.softmax(torch.cat([q @ keys[s:s + chunk].T for s in range(0, keys.shape[0], chunk)], 1) / temperature, 1)


def mean_distribution(queries: torch.Tensor, keys, weights: torch.Tensor, *, temperature: float = 0.05,
                      chunk: int = _CHUNK) -> torch.Tensor:
    """Σ_j w_j p(q_j) / Σ_j w_j: the weighted mean of the queries' distributions over the vocabulary,
    in two blockwise passes (running max and sum, then the accumulation): no [batch, V] matrix.
    keys: unit rows [V, d], or semantic bases (`SemanticBases`), whose cosines come from W and G⁻¹."""
    q = queries.to(torch.float32)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    m = torch.full((q.shape[0], 1), -torch.inf, device=q.device)
    z = torch.zeros(q.shape[0], 1, device=q.device)
    kept, room, end = [], _KEPT_COSINES // max(q.shape[0] * 4, 1), 0  # blocks the second pass need not recompute
    for s, cos in _cosine_blocks(q, keys, chunk):
        logits = cos / temperature
        m_new = torch.maximum(m, logits.max(dim=1, keepdim=True).values)
        z = z * torch.exp(m - m_new) + torch.exp(logits - m_new).sum(dim=1, keepdim=True)
        m = m_new
        room -= cos.shape[1]
        if room >= 0:  # a prefix of the blocks: the second pass computes the rest from where they end
            kept.append(cos)
            end = s + cos.shape[1]
    w = (weights.to(torch.float32) / weights.sum()).reshape(-1, 1) / z
    blocks = itertools.chain(kept, (cos for _, cos in _cosine_blocks(q, keys, chunk, start=end)))
    return torch.cat([(torch.exp(cos / temperature - m) * w).sum(dim=0) for cos in blocks])


def _cosine_blocks(q: torch.Tensor, keys, chunk: int, start: int = 0):
    """(start, cosines of the unit queries with keys start .. start + chunk) over the vocabulary; semantic
    bases' blocks are no wider than those they read their head in, nor larger."""
    if isinstance(keys, torch.Tensor):
        for s in range(start, keys.shape[0], chunk):
            yield s, q @ keys[s:s + chunk].T
    else:
        # each block of cosines (and its temporaries) a few of the head's blocks at most, however many queries
        chunk = min(chunk, keys.block, max(1, keys.block * keys.shape[1] // max(q.shape[0], 1)))
        projected = keys.unproject(q)
        for s in range(start, keys.vocab_size, chunk):
            yield s, keys.cosines(projected, s, s + chunk)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon divergence (natural log) of two distributions."""
    mid = 0.5 * (p + q)

    def kl(a, b):
        return float(torch.where(a > 0, a * (a.clamp_min(1e-30) / b.clamp_min(1e-30)).log(), 0.0).sum())

    return 0.5 * kl(p, mid) + 0.5 * kl(q, mid)
