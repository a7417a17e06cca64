"""Semantic alignment (METHOD §3): a linear map from a source's latent space into the pivot's,
estimated from the two LM heads alone, and its application to a source's weights."""
from __future__ import annotations

import math

import torch

from seme.semantic.mapping import semantic_mix


def alignment_map(src_unit: torch.Tensor, piv_unit: torch.Tensor, *, mode: str = "linear",
                  temperature: float = 0.05, topk: int | None = 64, anchors: int = 4096) -> torch.Tensor:
    """A ([d_piv, d_src]) with h_piv ≈ A h_src, from unit bases over shared tokens (rows correspond).

    linear: A = Ŝ_pivᵀ Ŝ_src, the map φ is in that mode. probability: the least-squares fit of φ on
    anchor vectors (an evenly spaced subset of the source's own bases).
    """
    if mode == "linear":
        return piv_unit.T.double() @ src_unit.double()
    if mode != "probability":
        raise ValueError(f"unknown alignment mode {mode!r}")
    step = max(1, src_unit.shape[0] // anchors)
    x = src_unit[::step]
    phi = semantic_mix(x, src_unit, piv_unit, temperature=temperature, topk=topk)
    # Magnitude calibration: anchors are unit vectors, so φ(x) is rescaled to unit length.
    phi = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.linalg.lstsq(x.double(), phi.double()).solution.T


def streamed_alignment_map(src, src_ids: torch.Tensor, piv, piv_ids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """The linear-mode map of `alignment_map`, Ŝ_pivᵀ Ŝ_src summed over blocks of shared tokens: the
    unit bases of the two heads (SemanticBases; rows src_ids[j] and piv_ids[j] correspond) are
    produced block by block, never held whole (2 x [V, d] floats: 4 GB for a 128k x 4096 head)."""
    A = None
    for start in range(0, src_ids.numel(), chunk):
        part = (piv.unit_rows(index=piv_ids[start:start + chunk]).T.double()
                @ src.unit_rows(index=src_ids[start:start + chunk]).double())
        A = part if A is None else A + part
    return A


def orthogonal_factor(A: torch.Tensor) -> torch.Tensor:
    """The polar factor U Vᵀ of A = U Σ Vᵀ: the orthogonal Procrustes solution."""
    U, _, Vh = torch.linalg.svd(A.double())
    return U @ Vh


def distance_from_identity(Q: torch.Tensor) -> float:
    """‖Q − I‖_F / √d: 0 for the identity, about √2 for a random rotation."""
    d = Q.shape[0]
    return float(torch.linalg.norm(Q - torch.eye(d, dtype=Q.dtype, device=Q.device))) / math.sqrt(d)


def rotate(t: torch.Tensor, role: str, layout: str, Q: torch.Tensor, src_gain: torch.Tensor | None,
           piv_gain: torch.Tensor | None) -> torch.Tensor:
    """One source tensor carried into pivot coordinates by the orthogonal Q (h_piv = Q h_src).

    Readers absorb the source's norm gain, turn with Qᵀ and give the pivot's gain back
    (W ← W diag(g_src) Qᵀ diag(1/g_piv)); writers turn with Q (W ← Q W); embeddings' rows turn
    with Q. Norm gains themselves are replaced by the pivot's by the caller.
    """
    Q = Q.to(torch.float32)
    if layout == "in_out":  # GPT-2 Conv1D stores [in, out]: transpose into the Linear convention
        return rotate(t.T, role, "out_in", Q, src_gain, piv_gain).T
    if role in ("read", "lm_head"):
        w = t * src_gain if src_gain is not None else t
        w = w @ Q.T
        return w / piv_gain if piv_gain is not None else w
    if role in ("embedding", "position_embedding"):
        return t @ Q.T
    if role == "write":
        return Q @ t
    if role == "write_bias":
        return Q @ t
    raise ValueError(f"role {role!r} is not rotated")
