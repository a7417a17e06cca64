"""Inputs and parameter sets shared by the GPU kernel tests (CUDA C++ and Triton)."""
from __future__ import annotations

import torch

from seme.methods.inputs import Inputs

FAMILY = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear"]
# Negative weights (signs of weighted deltas) and a dropped model (density 0), under each option set.
OPTIONS_PARAMS = {"weight": [1.0, -0.5, 0.8], "density": [0.3, 0.0, 0.6]}
OPTIONS = [
    {"rescale": True, "normalize": False, "lambda": 0.7},
    {"rescale": False, "normalize": True, "lambda": 1.3},
]


def make_inputs(shape, k, dtype=torch.float32, tied=False, seed=0, name="model.layers.0.mlp.w"):
    """A base and k fine-tunes of `shape`; the base sits second, since model indices key the draws."""
    g = torch.Generator().manual_seed(seed)
    if tied:  # integer-valued deltas: many equal magnitudes, exact in bf16 and fp16 too
        base = torch.randint(-8, 8, shape, generator=g).float() * 0.5
        xs = [base + torch.randint(-3, 4, shape, generator=g).float() for _ in range(k)]
    else:
        base = torch.randn(shape, generator=g)
        xs = [base + 0.1 * torch.randn(shape, generator=g) * (i + 1) for i in range(k)]
    tensors = tuple(t.to(dtype) for t in [xs[0], base, *xs[1:]])
    return Inputs(tensors, base_index=1, name=name, seed=seed + 7)


def without_base(inputs: Inputs) -> Inputs:
    """The fine-tunes of `inputs` alone (LRP merges them without a base)."""
    return Inputs(inputs.others, None, inputs.name, inputs.seed)
