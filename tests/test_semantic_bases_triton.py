"""The Triton basis-norms kernel against a float64 SVD pseudoinverse and the torch block products: on
a GPU when there is one, else on CPU through the interpreter (small sizes)."""
from __future__ import annotations


import pytest
import torch

from triton_device import DEVICE  # first: it sets up the interpreter where there is no GPU

from seme.kernels import semantic_bases as kernel  # noqa: E402
from seme.semantic.bases import block_norms, semantic_bases  # noqa: E402


@pytest.mark.parametrize("v, d, spread", [(1, 1, 0.0), (7, 5, 1.0), (130, 33, 2.0), (200, 64, 0.0), (97, 70, 1.0)])
def test_matches_float64_pinv_norms(v, d, spread):
    g = torch.Generator().manual_seed(v + d)
    W = torch.randn(max(v, d + 1), d, generator=g) @ torch.diag(torch.logspace(0, spread, d))
    (bases,) = semantic_bases([W])  # its G⁻¹: fp32 at these conditionings
    assert bases.inverse.dtype == torch.float32
    ref64 = torch.linalg.pinv(W.double()).T.norm(dim=1)
    eager = block_norms(bases)  # torch block products, fp32
    got = kernel.basis_norms(W.to(DEVICE), bases.inverse.to(DEVICE)).cpu()
    assert got.shape == (W.shape[0],) and got.dtype == torch.float32
    # |ref64 − kernel| ≤ |ref64 − eager fp32| + fp32 rounding of the reordered sums
    err, eager_err = (got.double() - ref64).abs(), (eager.double() - ref64).abs()
    assert (err <= eager_err + 1e-5 * ref64).all()


def test_refuses_a_mismatched_inverse():
    with pytest.raises(ValueError, match="must be"):
        kernel.basis_norms(torch.randn(4, 3, device=DEVICE), torch.eye(4, device=DEVICE))
