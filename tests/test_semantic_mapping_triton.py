"""The Triton semantic-mapping kernel against the chunked torch mapping and a float64 reference: on a
GPU when there is one, else on CPU through the interpreter (small sizes)."""
from __future__ import annotations


import pytest
import torch

from triton_device import DEVICE  # first: it sets up the interpreter where there is no GPU

from seme.kernels import semantic_mapping  # noqa: E402
from seme.semantic import mapping  # noqa: E402


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("mode, temperature", [("softmax", 0.05), ("softmax", 1.0), ("linear", 1.0)])
@pytest.mark.parametrize("b, v, dk, dv", [(1, 1, 3, 2), (5, 300, 40, 70), (17, 129, 65, 64)])
def test_matches_torch_mapping(mode, temperature, b, v, dk, dv):
    g = torch.Generator().manual_seed(b + v)
    keys = unit(torch.randn(v, dk, generator=g))
    queries = keys[torch.randint(0, v, (b,), generator=g)] + 0.3 * torch.randn(b, dk, generator=g)  # peaked
    values = torch.randn(v, dv, generator=g)
    cosines = unit(queries.double()) @ keys.double().T  # the float64 reference, [b, v] materialised
    weights = torch.softmax(cosines / temperature, dim=1) if mode == "softmax" else cosines
    ref64 = weights @ values.double()
    eager = mapping.semantic_mix(queries, keys, values, temperature=temperature, mode=mode, chunk=64)
    got = semantic_mapping.semantic_mix(queries.to(DEVICE), keys.to(DEVICE), values.to(DEVICE),
                                        temperature=temperature, mode=mode).cpu()
    assert got.shape == (b, dv) and got.dtype == torch.float32
    # as accurate as the fp32 torch mapping, up to fp32 rounding of the reordered sums
    assert (got.double() - ref64).abs().max() <= (eager.double() - ref64).abs().max() + 1e-5


def test_refuses_bad_shapes_and_modes():
    keys, values = unit(torch.randn(10, 4)), torch.randn(10, 3)
    with pytest.raises(ValueError, match="keys must be"):
        semantic_mapping.semantic_mix(torch.randn(2, 5, device=DEVICE), keys.to(DEVICE), values.to(DEVICE))
    with pytest.raises(ValueError, match="unknown mapping mode"):
        semantic_mapping.semantic_mix(torch.randn(2, 4, device=DEVICE), keys.to(DEVICE), values.to(DEVICE),
                                      mode="topk")
