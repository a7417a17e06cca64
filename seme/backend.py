"""Which implementation merges a tensor: the fused kernels by default, the plain-torch reference
on request (`--backend reference`) or where no kernel covers the method.

CPU tensors go to the C++/OpenMP kernel (seme._C), SeMe's Select / Compute / Erase included (the
SCE kernel, which also counts what SeMe reports), and so do linear, SLERP, Model Stock (not
filter-wise), RAM and RAM+. CUDA tensors of the task-vector family and SCE go to whichever GPU kernel
was faster for the method in `python -m bench.kernels --device cuda` (bench/RESULTS.md, H100): the
CUDA C++ one (seme._C_cuda, up to 8 non-base models) for all but DARE, the Triton one for DARE and for
SeMe's fusion (its SCE kernel counts SeMe's statistics); linear, SLERP, Model Stock (not filter-wise),
RAM and RAM+ go to their Triton kernels (seme.kernels.linear_merge), which no CUDA C++ kernel has.
All draw the same masks as the reference, so the backend changes speed, not results (fp32 sums apart).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from seme import fused_merge
from seme.errors import SemeError
from seme.methods import registry
from seme.methods.inputs import Inputs

# On an H100 (bench/RESULTS.md, and a second run of it the same day) Triton was faster on DARE
# (1.2-1.4x); the CUDA kernels were as fast or faster on task arithmetic (1.0-1.5x, and no JIT
# compilation on first use), 9-13x faster on the rank-selection methods, 4.4-6.5x on SCE and
# 4.4-4.8x on DELLA.
TRITON_FIRST = frozenset({"dare_ties", "dare_linear"})
# Input dtypes the fused kernels widen to fp32 as they load: a cast to fp32 first would only copy.
WIDENED_BY_KERNELS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class Merged:
    """A merged tensor and what is known of it: the statistics of methods that report them (their
    tensor still in the compute dtype; every other is in the requested dtype), and whether the
    inputs and the output were finite, where a kernel saw it in passing (None: not checked;
    inputs_finite False: some input may hold NaN or Inf)."""

    tensor: torch.Tensor
    stats: dict | None = None
    inputs_finite: bool | None = None
    output_finite: bool | None = None


def implementation(method: str, backend: str, device: torch.device) -> tuple[Callable, bool]:
    """(`impl(inputs, params, out_dtype) -> Merged`, whether it is a fused kernel) for one method on
    one device."""
    spec = registry.get(method)

    def reference(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged:
        result = spec.fn(inputs, params)
        if isinstance(result, tuple):  # cast by the caller, after it has read the statistics
            return Merged(*result)
        return Merged(result.to(out_dtype))

    if backend == "reference":
        return reference, False
    kernel = _fused(method, device)
    if kernel is None:
        if backend == "fused":
            raise SemeError(f"no fused kernel for method '{method}' on {device.type} "
                            f"(kernels cover the task-vector family, sce, linear, slerp, model_stock and ram, on CUDA "
                            f"with Triton for the last four; use --backend auto)")
        return reference, False

    def fused(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged:
        too_large = inputs.tensors[0].numel() >= fused_merge.MAX_ELEMENTS
        if too_large or any(t.dtype == torch.float64 for t in inputs.tensors):  # the kernels compute in fp32
            return reference(inputs, params, out_dtype)
        merged = kernel(inputs, params, out_dtype)
        return merged if merged is not None else reference(inputs, params, out_dtype)

    return fused, True


def _fused(method: str, device: torch.device):
    if device.type == "cpu":
        if not fused_merge.available():
            return None
        if method == "seme":  # the SCE kernel, with SeMe's statistics

            def cpu_seme(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged:
                tensor, stats, inputs_finite = fused_merge.seme_fuse(inputs, params)
                # the output is checked once the pipeline has recorded (and maybe stabilised) it
                return Merged(tensor, stats=stats, inputs_finite=inputs_finite)

            return cpu_seme
        if method not in fused_merge.METHODS:
            return None

        def cpu(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged | None:
            if not fused_merge.covers(method, params, tuple(inputs.tensors[0].shape)):
                return None  # the reference
            tensor, inputs_finite, output_finite = fused_merge.merge(method, inputs, params, out_dtype=out_dtype,
                                                                     checks=True)
            return Merged(tensor, inputs_finite=inputs_finite, output_finite=output_finite)

        return cpu
    if device.type == "cuda":
        from seme import cuda_merge

        try:
            from seme.kernels import fused_merge as triton_merge
            from seme.kernels import linear_merge as triton_linear
        except ImportError:  # no triton
            triton_merge = triton_linear = None
        if method == "seme":
            return None if triton_merge is None else _gpu_seme(triton_merge)
        if method in fused_merge.TRITON_ONLY_METHODS:
            return None if triton_linear is None else _gpu_linear(method, triton_linear)
        native = cuda_merge.available() and method in cuda_merge.METHODS
        use_triton = triton_merge is not None and method in triton_merge.SUPPORTED
        if not native and not use_triton:
            return None  # the reference runs on the GPU
        triton_first = use_triton and method in TRITON_FIRST

        def gpu(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged | None:
            if not fused_merge.ranks_along_rows(method, tuple(inputs.tensors[0].shape)):
                return None  # the reference
            fits = native and len(inputs.others) <= cuda_merge.max_models()
            if fits and not triton_first:
                return Merged(cuda_merge.merge(method, inputs, params, out_dtype=out_dtype))
            if use_triton and triton_merge.fits(inputs.tensors[0].numel(), len(inputs.others)):
                return Merged(triton_merge.fused_merge(method, inputs, params, out_dtype))
            if fits:
                return Merged(cuda_merge.merge(method, inputs, params, out_dtype=out_dtype))
            return None  # more models or elements than the kernels take: the reference

        return gpu
    return None


def _gpu_linear(method: str, triton_linear):
    """Linear, SLERP, Model Stock, RAM or RAM+ on their Triton kernels; the reference where those do not
    cover the parameters (filter-wise Model Stock) or the size."""

    def gpu_linear(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged | None:
        if not triton_linear.covers(method, params) or inputs.tensors[0].numel() >= triton_linear.MAX_ELEMENTS:
            return None
        return Merged(triton_linear.fused_merge(method, inputs, params, out_dtype))

    return gpu_linear


def _gpu_seme(triton_merge):
    """SeMe's fusion on the Triton SCE kernel, with its statistics; the reference beyond its limits."""

    def gpu_seme(inputs: Inputs, params: dict, out_dtype: torch.dtype) -> Merged | None:
        if not triton_merge.fits(inputs.base.numel(), len(inputs.others)):
            return None
        tensor, stats = triton_merge.seme_fuse(inputs, params)
        return Merged(tensor, stats=stats)

    return gpu_seme
