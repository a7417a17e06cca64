"""Semantic alignment (METHOD §3): a linear map from a source's latent space into the pivot's,
estimated from the two LM heads alone, and its application to a source's weights."""
from __future__ import annotations

import math

import torch

from seme.architectures import orientation
from seme.semantic.bases import SemanticBases
from seme.semantic.mapping import semantic_mix


def alignment_map(src: SemanticBases, piv: SemanticBases, src_ids: torch.Tensor | None = None,
                  piv_ids: torch.Tensor | None = None, *, mode: str = "linear", temperature: float = 0.05,
                  topk: int | None = 64, anchors: int = 4096, chunk: int | None = None) -> torch.Tensor:
    """A ([d_piv, d_src], float64) with h_piv ≈ A h_src, from the two heads' bases over shared tokens
    (src_ids[j] and piv_ids[j] are the same token; all tokens in order when not given).

    linear: A = Ŝ_pivᵀ Ŝ_src, the map φ is in that mode. probability: the least-squares fit of φ on
    anchor vectors (an evenly spaced subset of the source's own unit bases).
    Neither forms the [V, d] bases (2 x 2 GB for 128k x 4096 heads): with ŝ_i = w_i G⁻¹ / |s_i|,
    Ŝ_pivᵀ Ŝ_src = G_piv⁻¹ (Σ_j w_piv,j w_src,jᵀ / (|s_piv,j| |s_src,j|)) G_src⁻¹, one [d, V] x [V, d]
    product where materialised bases cost three; φ's keys and values are read the same way. `chunk`:
    shared tokens per block of that product (by default the bases' block).
    """
    if src_ids is None:
        src_ids = torch.arange(src.vocab_size)
    if piv_ids is None:
        piv_ids = torch.arange(piv.vocab_size)
    if src_ids.shape != piv_ids.shape:
        raise ValueError(f"{src_ids.numel()} source and {piv_ids.numel()} pivot token ids do not pair up")
    if mode == "linear":
        chunk = chunk or min(src.block, piv.block)
        middle = None
        for start in range(0, src_ids.numel(), chunk):
            part = (piv.scaled_rows(index=piv_ids[start:start + chunk]).T.double()
                    @ src.scaled_rows(index=src_ids[start:start + chunk]).double())
            middle = part if middle is None else middle + part
        return piv.inverse.double() @ middle @ src.inverse.double()
    if mode != "probability":
        raise ValueError(f"unknown alignment mode {mode!r}")
    x = src.unit_rows(index=src_ids[::max(1, src_ids.numel() // anchors)])
    phi = semantic_mix(x, src.subset(src_ids), piv.subset(piv_ids), temperature=temperature, topk=topk)
    # Magnitude calibration: anchors are unit vectors, so φ(x) is rescaled to unit length.
    phi = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.linalg.lstsq(x.double(), phi.double()).solution.T


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
    (W ← W diag(g_src) Qᵀ diag(1/g_piv)); writers turn with Q (W ← Q W); maps from the stream to
    the stream with both (W ← Q W diag(g_src) Qᵀ diag(1/g_piv), where they read a norm's output);
    embeddings' rows, and vectors in the stream, turn with Q.
    Norm gains themselves are replaced by the pivot's by the caller.
    """
    Q = Q.to(torch.float32)
    layout = orientation(layout, role, t.shape, Q.shape[0])
    if layout == "in_out":  # [in, out] (GPT-2's Conv1D; fused experts' [E, in, out]): into the Linear convention
        return rotate(t.mT, role, "out_in", Q, src_gain, piv_gain).mT
    if role in ("read", "lm_head", "stream_map"):  # a stream map may read the normalised stream (DeciLM's linears)
        w = t * src_gain if src_gain is not None else t
        w = (Q @ w if role == "stream_map" else w) @ Q.T  # a new tensor: divided in place
        return w.div_(piv_gain) if piv_gain is not None else w
    # rows in the stream (a write bias: [d], or one per expert [E, d])
    if role in ("embedding", "position_embedding", "stream_vector", "write_bias"):
        return t @ Q.T
    if role == "write":
        return Q @ t
    raise ValueError(f"role {role!r} is not rotated")
