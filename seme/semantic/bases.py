"""Semantic bases (METHOD §1): s_i = G⁻¹ w_i with G = WᵀW, the least-squares latent whose logits are e_i.

The [V, d] pseudoinverse is never formed by SVD: the d×d Gram matrix is accumulated in one
streaming pass over W (in float64 where fp32 would lose digits: fp32 normal equations lose ~1e-2
relative accuracy at condition number 1e3), Cholesky-factored (with a ridge eps·tr(G)/d only if
it is not positive definite or its condition number exceeds 1e12), inverted (d×d), and applied to
rows of W as they are needed. Heads of the same width are factored in one batched call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seme.errors import SemeError

_CHUNK = 16384
_MAX_CONDITION = 1e12
_FP32_GRAM_CONDITION = 1e2
_FP32_ROWS_CONDITION = 1e6


def gram(W: torch.Tensor, dtype: torch.dtype = torch.float64, chunk: int = _CHUNK) -> torch.Tensor:
    """WᵀW accumulated in `dtype`, streaming over row blocks of W."""
    d = W.shape[1]
    G = torch.zeros(d, d, dtype=dtype, device=W.device)
    for start in range(0, W.shape[0], chunk):
        block = W[start:start + chunk].to(dtype)
        G.addmm_(block.T, block)
    return G


@dataclass
class SemanticBases:
    """Bases of one LM head W ([V, d]): rows of S = W G⁻¹, produced block by block."""

    W: torch.Tensor  # the effective head (final-norm gain folded in), float32
    inverse: torch.Tensor  # G⁻¹ (+ ridge) in the precision its rows are applied in
    condition: float  # condition number of G
    ridge: float  # the ridge added (0 when G was positive definite)
    norms: torch.Tensor | None = None  # |s_i|, once needed

    @property
    def vocab_size(self) -> int:
        return self.W.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the [V, d] bases these stand for."""
        return tuple(self.W.shape)

    def subset(self, index: torch.Tensor) -> "SemanticBases":
        """The bases of the tokens `index` (a shared vocabulary), still as W rows and the same G⁻¹."""
        norms = self.row_norms()[index]
        return SemanticBases(self.W[index], self.inverse, self.condition, self.ridge, norms)

    def rows(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Basis rows (float32): a range, or the rows named by `index`."""
        return self.unproject(self.W[index] if index is not None else self.W[start:stop])

    def unit_rows(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        s = self.rows(start, stop, index)
        return s / s.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def cosines(self, unit_queries: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """cos(q, s_i) for unit queries and bases start..stop, from W and G⁻¹ alone: q·s_i = (G⁻¹q)·w_i
        (G⁻¹ is symmetric), so no basis row is formed: the [V, d] bases never exist in memory."""
        return (self.unproject(unit_queries) @ self.W[start:stop].T) / self.row_norms()[start:stop]

    def scaled_rows(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """w_i / |s_i|: unit bases before G⁻¹, so Σ_i p_i ŝ_i = unproject(Σ_i p_i w_i / |s_i|)."""
        if index is not None:
            return self.W[index] / self.row_norms()[index].unsqueeze(-1)
        return self.W[start:stop] / self.row_norms()[start:stop, None]

    def unproject(self, x: torch.Tensor) -> torch.Tensor:
        """x G⁻¹ (float32): combinations of W rows carried to the same combinations of bases."""
        return (x.to(self.inverse.dtype) @ self.inverse).to(torch.float32)

    def row_norms(self, chunk: int = _CHUNK) -> torch.Tensor:
        """|s_i| of every basis (V floats, kept): fused on a GPU, else block by block."""
        if self.norms is None:
            self.norms = basis_norms(self.W, self.inverse, chunk).clamp_min(1e-30)
        return self.norms

    def materialize(self, unit: bool = False, chunk: int = _CHUNK) -> torch.Tensor:
        get = self.unit_rows if unit else self.rows
        return torch.cat([get(i, i + chunk) for i in range(0, self.vocab_size, chunk)])


def basis_norms(W: torch.Tensor, inverse: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """|w_i G⁻¹| for every row of W, without the [V, d] bases: one Triton kernel on a GPU (fp32 G⁻¹),
    else blocks of `chunk` rows through the matrix product."""
    if W.is_cuda and inverse.dtype == torch.float32:
        try:
            from seme.kernels import semantic_bases as kernel
        except ImportError:  # no triton: the block products run on the GPU
            pass
        else:
            return kernel.basis_norms(W, inverse)
    return block_norms(W, inverse, chunk)


def block_norms(W: torch.Tensor, inverse: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """|w_i G⁻¹| through the matrix product, `chunk` rows of the bases at a time."""
    return torch.cat([(W[i:i + chunk].to(inverse.dtype) @ inverse).norm(dim=1).to(torch.float32)
                      for i in range(0, W.shape[0], chunk)])


def semantic_bases(heads: list[torch.Tensor], names: list[str] | None = None) -> list[SemanticBases]:
    """Bases of several heads (named `names` in errors); Gram matrices of equal width are factored
    in one batched call.

    Precision follows the conditioning: the Gram matrix is first accumulated in float32 (cheap)
    and, when its condition number shows fp32 would lose digits (> 1e2), again in float64; rows
    are produced with an fp32 product while G⁻¹ amplifies rounding by less than 1e6, else in fp64.
    """
    out: list[SemanticBases | None] = [None] * len(heads)
    by_width: dict[int, list[int]] = {}
    for i, W in enumerate(heads):
        by_width.setdefault(W.shape[1], []).append(i)
    for width, members in by_width.items():
        G = torch.stack([gram(heads[i], torch.float32) for i in members]).double()
        conditions = _conditions(G)
        for j, i in enumerate(members):
            if conditions[j] > _FP32_GRAM_CONDITION:
                G[j] = gram(heads[i])
        conditions = _conditions(G)
        chol, info = torch.linalg.cholesky_ex(G)
        ridges = [0.0] * len(members)
        # Not positive definite, or so ill-conditioned that G⁻¹ would be noise even in float64.
        for j in range(len(members)):
            if info[j] != 0 or conditions[j] > _MAX_CONDITION:
                ridges[j] = 1e-6 * float(G[j].trace()) / width
                if not ridges[j] > 0:  # an all-zero (or non-finite) head: no ridge can make it invertible
                    name = names[members[j]] if names else f"number {members[j]}"
                    raise SemeError(f"SeMe: the LM head of {name}, scaled by its final norm's gains, is "
                                    f"{'zero' if ridges[j] == 0 else 'not finite'}: it has no semantic bases")
                chol[j] = torch.linalg.cholesky(G[j] + ridges[j] * torch.eye(width, dtype=G.dtype, device=G.device))
        inverse = torch.cholesky_inverse(chol)
        for j, i in enumerate(members):
            dtype = torch.float32 if conditions[j] < _FP32_ROWS_CONDITION else torch.float64
            out[i] = SemanticBases(heads[i].to(torch.float32), inverse[j].to(dtype), conditions[j], ridges[j])
    return out  # type: ignore[return-value]


def _conditions(G: torch.Tensor) -> list[float]:
    eig = torch.linalg.eigvalsh(G)
    return (eig[:, -1] / eig[:, 0].clamp_min(1e-300)).tolist()
