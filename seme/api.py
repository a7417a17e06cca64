"""In-memory merging: `merge_tensors`, the same methods the engine runs, on tensors you hold."""
from __future__ import annotations

from typing import Sequence

import torch

from seme.errors import SemeError
from seme.methods import registry
from seme.methods.inputs import Inputs


def merge_tensors(method: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
                  name: str = "tensor", seed: int = 0, out_dtype: torch.dtype | None = None,
                  **params) -> torch.Tensor:
    """Merge `tensors` (and `base`, if the method uses one) with a registered method.

    Per-input parameters take a scalar (broadcast) or a list with one value per tensor in
    `tensors` (INPUT-scoped parameters of methods that use a base also count the base, first).
    `name` and `seed` key the random draws of DARE / DELLA.
    """
    try:
        spec = registry.get(method)
    except KeyError:
        raise SemeError(f"unknown merge method '{method}'{registry.suggest(method, registry.names())}") from None
    all_tensors = ([base] if base is not None else []) + list(tensors)
    base_index = 0 if base is not None else None
    problem = spec.check_inputs(len(all_tensors), base_index is not None)
    if problem:
        raise SemeError(problem)
    shapes = {tuple(t.shape) for t in all_tensors}
    if len(shapes) != 1:
        raise SemeError(f"tensors of different shapes cannot be merged: {sorted(shapes)}")
    bound = registry.bind(spec, params, len(all_tensors), base_index, f"merge_tensors({method})")
    inputs = Inputs(tuple(all_tensors), base_index if spec.base != "ignored" else None, name, seed)
    result = spec.fn(inputs, bound)
    return result.to(out_dtype or all_tensors[0].dtype)
