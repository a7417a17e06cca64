"""Run mergekit 0.1.5's own implementation of a method on in-memory tensors (the parity oracle)."""
from __future__ import annotations

import contextlib

import torch


def mergekit_merge(method: str, tensors, base=None, **params) -> torch.Tensor:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    all_tensors = ([base] if base is not None else []) + list(tensors)
    group = TensorGroup.from_tensors(all_tensors, base_index=0 if base is not None else None, name="t")
    (out,) = registry.get(method)([group], parameters=params)
    return out


@contextlib.contextmanager
def bernoulli_from(masks, probabilities=None):
    """Make torch.bernoulli return the given masks in call order (mergekit draws one per model),
    checking that mergekit asks with the given probabilities (where given)."""
    pending = list(masks)
    expected = list(probabilities) if probabilities is not None else None
    original = torch.bernoulli

    def fake(p, *args, **kwargs):
        mask = pending.pop(0)
        assert mask.shape == p.shape
        if expected is not None:
            torch.testing.assert_close(p.float(), expected.pop(0).reshape(p.shape).float())
        return mask.to(p.dtype)

    torch.bernoulli = fake
    try:
        yield
    finally:
        torch.bernoulli = original
    assert not pending, "mergekit drew fewer masks than expected"
