"""Passthrough: copy one input (optionally scaled). The building block of frankenmerges via slices."""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods.inputs import Inputs
from seme.methods.registry import INPUT, Method, Param, register

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


def passthrough(inputs: Inputs, p: dict) -> torch.Tensor:
    (tensor,) = inputs.tensors
    scale = p["scale"][0]
    return tensor if scale is None else tensor * scale


register(Method("passthrough", passthrough, (Param("scale", float, INPUT, default=None),), max_inputs=1,
                peak_buffers=(1.0, 0.0)))
