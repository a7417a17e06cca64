"""Where the Triton kernel tests run: on a GPU when there is one, else on CPU tensors through the
interpreter. Imported first by those tests; skips the importing module where neither can work."""
from __future__ import annotations

import os
import sys

import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# Triton picks the interpreter when a @jit function is defined, its own library included: the variable
# must be set before triton is first imported in the process.
if not GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: run this file in its own process",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # the kernels then run on CPU tensors
pytest.importorskip("triton")
