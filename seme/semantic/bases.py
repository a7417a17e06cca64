"""Semantic bases (METHOD §1): s_i = G⁻¹ w_i with G = WᵀW, the least-squares latent whose logits are e_i.

The [V, d] pseudoinverse is never formed by SVD: the d×d Gram matrix is accumulated in one
streaming pass over W (in float64 where fp32 would lose digits: fp32 normal equations lose ~1e-2
relative accuracy at condition number 1e3), Cholesky-factored (with a ridge eps·tr(G)/d only if
it is not positive definite or its condition number exceeds 1e12), inverted (d×d), and applied to
rows of W as they are needed. A head is read a block of rows at a time (never copied whole), and
heads are factored one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seme.errors import SemeError
from seme.semantic.memory import block_rows

_MAX_CONDITION = 1e12
_FP32_GRAM_CONDITION = 1e2
_FP32_ROWS_CONDITION = 1e6


@dataclass
class SemanticBases:
    """Bases of one LM head: rows of S = W G⁻¹ for the effective head W = head · diag(gain) (the final
    norm's gains folded in), produced block by block from the head as it is stored (a view of the
    mapped file): no [V, d] copy of it is held."""

    head: torch.Tensor  # [V, d], any float dtype
    gain: torch.Tensor | None  # float32 [d], or None
    inverse: torch.Tensor  # G⁻¹ (+ ridge) in the precision its rows are applied in
    condition: float  # condition number of G
    ridge: float  # the ridge added (0 when G was positive definite)
    norms: torch.Tensor | None = None  # |s_i|, once needed
    tokens: torch.Tensor | None = None  # a subset's rows of the head (`subset`); None: all of them

    @property
    def vocab_size(self) -> int:
        return self.head.shape[0] if self.tokens is None else self.tokens.numel()

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the [V, d] bases these stand for."""
        return self.vocab_size, self.head.shape[1]

    @property
    def block(self) -> int:
        """Rows read at a time."""
        return block_rows(self.head.shape[1])

    def W(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the effective head (float32): a range, or the rows named by `index`."""
        if self.tokens is not None:
            index = self.tokens[index] if index is not None else self.tokens[start:stop]
        rows = (self.head[index] if index is not None else self.head[start:stop]).to(torch.float32)
        return rows * self.gain if self.gain is not None else rows

    def subset(self, index: torch.Tensor) -> "SemanticBases":
        """The bases of the tokens `index` (a shared vocabulary): rows of the same head (not copied) and G⁻¹."""
        norms = self.row_norms()[index]
        tokens = index if self.tokens is None else self.tokens[index]
        return SemanticBases(self.head, self.gain, self.inverse, self.condition, self.ridge, norms, tokens)

    def rows(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Basis rows (float32): a range, or the rows named by `index`."""
        return self.unproject(self.W(start, stop, index))

    def unit_rows(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        s = self.rows(start, stop, index)
        return s / s.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def cosines(self, projected: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """cos(q, s_i) for unit queries q and bases start..stop, from `projected` = unproject(q) (G⁻¹q, made
        once for every block) and W: q·s_i = (G⁻¹q)·w_i (G⁻¹ is symmetric), so no basis row is formed: the
        [V, d] bases never exist in memory."""
        return (projected @ self.W(start, stop).T) / self.row_norms()[start:stop]

    def scaled_rows(self, start: int = 0, stop: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """w_i / |s_i|: unit bases before G⁻¹, so Σ_i p_i ŝ_i = unproject(Σ_i p_i w_i / |s_i|)."""
        if index is not None:
            return self.W(index=index) / self.row_norms()[index].unsqueeze(-1)
        return self.W(start, stop) / self.row_norms()[start:stop, None]

    def unproject(self, x: torch.Tensor) -> torch.Tensor:
        """x G⁻¹ (float32): combinations of W rows carried to the same combinations of bases."""
        return (x.to(self.inverse.dtype) @ self.inverse).to(torch.float32)

    def row_norms(self) -> torch.Tensor:
        """|s_i| of every basis (V floats, kept): fused on a GPU, else block by block."""
        if self.norms is None:
            self.norms = basis_norms(self).clamp_min(1e-30)
        return self.norms

    def materialize(self, unit: bool = False) -> torch.Tensor:
        get = self.unit_rows if unit else self.rows
        return torch.cat([get(i, i + self.block) for i in range(0, self.vocab_size, self.block)])


def gram(bases: SemanticBases, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """WᵀW of the effective head, accumulated in `dtype` block by block."""
    d = bases.shape[1]
    G = torch.zeros(d, d, dtype=dtype, device=bases.head.device)
    for start in range(0, bases.vocab_size, bases.block):
        block = bases.W(start, start + bases.block).to(dtype)
        G.addmm_(block.T, block)
    return G


def basis_norms(bases: SemanticBases) -> torch.Tensor:
    """|w_i G⁻¹| for every row of W, without the [V, d] bases: one Triton kernel on a GPU (fp32 G⁻¹),
    else block by block through the matrix product."""
    if bases.head.is_cuda and bases.inverse.dtype == torch.float32:
        try:
            from seme.kernels import semantic_bases as kernel
        except ImportError:  # no triton: the block products run on the GPU
            pass
        else:
            return kernel.basis_norms(bases.W(), bases.inverse)
    return block_norms(bases)


def block_norms(bases: SemanticBases) -> torch.Tensor:
    """|w_i G⁻¹| through the matrix product, a block of rows at a time."""
    return torch.cat([(bases.W(i, i + bases.block).to(bases.inverse.dtype) @ bases.inverse).norm(dim=1)
                      .to(torch.float32) for i in range(0, bases.vocab_size, bases.block)])


def semantic_bases(heads: list[torch.Tensor], names: list[str] | None = None,
                   gains: list[torch.Tensor | None] | None = None) -> list[SemanticBases]:
    """Bases of several heads [V, d] (any float dtype, read block by block: a mapped file's view is
    never copied whole), each scaled by its `gains` (the final norm's, [d]) where given; `names`
    name them in errors. One head is factored at a time: the d x d matrices of one are held, and
    the inverses of those done.

    Precision follows the conditioning: the Gram matrix is first accumulated in float32 (cheap)
    and, when its condition number shows fp32 would lose digits (> 1e2), again in float64; rows
    are produced with an fp32 product while G⁻¹ amplifies rounding by less than 1e6, else in fp64.
    """
    out = []
    for i, head in enumerate(heads):
        gain = gains[i].to(torch.float32) if gains is not None and gains[i] is not None else None
        bases = SemanticBases(head, gain, torch.empty(0), 0.0, 0.0)
        width = head.shape[1]
        G = gram(bases, torch.float32).double()
        condition = _condition(G)
        if condition > _FP32_GRAM_CONDITION:
            G = gram(bases)
            condition = _condition(G)
        chol, info = torch.linalg.cholesky_ex(G)
        ridge = 0.0
        # Not positive definite, or so ill-conditioned that G⁻¹ would be noise even in float64.
        if info != 0 or condition > _MAX_CONDITION:
            ridge = 1e-6 * float(G.trace()) / width
            if not ridge > 0:  # an all-zero (or non-finite) head: no ridge can make it invertible
                name = names[i] if names else f"number {i}"
                raise SemeError(f"SeMe: the LM head of {name}, scaled by its final norm's gains, is "
                                f"{'zero' if ridge == 0 else 'not finite'}: it has no semantic bases")
            chol = torch.linalg.cholesky(G + ridge * torch.eye(width, dtype=G.dtype, device=G.device))
        del G
        inverse = torch.cholesky_inverse(chol)
        del chol
        bases.inverse = inverse.to(torch.float32 if condition < _FP32_ROWS_CONDITION else torch.float64)
        bases.condition, bases.ridge = condition, ridge
        out.append(bases)
    return out


def _condition(G: torch.Tensor) -> float:
    eig = torch.linalg.eigvalsh(G)
    return float(eig[-1] / eig[0].clamp_min(1e-300))
