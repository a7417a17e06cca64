"""Exact rank selection without sorting: which elements fall in a rank interval.

Elements are ranked by (value, element index) ascending, so ties are broken by position: among
equal values, the later element ranks higher. Every method that keeps "the top k" or "the bottom
k" uses this one rule, and the fused kernels reproduce it exactly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


def _ranks_below(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mask of the elements of flat `x` whose rank is < r."""
    import torch

    n = x.numel()
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    if r >= n:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    v = torch.kthvalue(x, r).values  # the r-th smallest (1-based)
    below = x < v
    equal = x == v
    room = r - int(below.sum())
    return below | (equal & (torch.cumsum(equal, 0) <= room))


def rank_interval_mask(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask (shape of x) of the elements whose ascending rank lies in [lo, hi)."""
    flat = x.reshape(-1)
    return (_ranks_below(flat, hi) & ~_ranks_below(flat, lo)).reshape(x.shape)


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest elements of x (ties: later elements first)."""
    n = x.numel()
    return rank_interval_mask(x, n - k, n)


def rank_positions(x: torch.Tensor) -> torch.Tensor:
    """Ascending rank (0-based) of each element along the last dimension, ties by position."""
    import torch

    order = torch.sort(x, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order).contiguous())
    return ranks
