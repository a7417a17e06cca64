"""NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the other model's
value where it is near the base's, and move towards it less the farther it is: per element,
weight = clamp(t / |base - other|, 0, 1)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import Method, Param, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


def nearswap(inputs: Inputs, p: dict) -> torch.Tensor:
    dtype = compute_dtype(inputs.base)
    a = inputs.base.to(dtype)
    (b,) = (x.to(dtype) for x in inputs.others)
    weight = (p["t"] / (a - b).abs_().clamp_(min=1e-6)).clamp_(min=0, max=1)
    return weight * b + (1 - weight) * a  # mergekit's order of operations, so the results agree


register(Method("nearswap", nearswap, (Param("t", float, minimum=0.0),), base="required", min_inputs=2,
                max_inputs=2, peak_buffers=(3.0, 2.0), reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"))
