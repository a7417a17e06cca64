"""Fused CUDA kernels (seme._C_cuda, CUDA C++) for the task-vector family and SCE: the contract of
`seme.fused_merge.merge` (same masks as the plain-torch references, fp32 results equal up to the
rounding of the global sums) on CUDA tensors, enqueued on the current stream without host waits.

Up to 8 non-base models per launch (their deltas stay in registers); more go to the Triton kernels.
DELLA's keep probability (a rank within each row) comes from a CUDA kernel that sorts each row in one
thread block, for rows of up to DELLA_MAX_COLS elements; longer rows are sorted by torch.
"""
from __future__ import annotations

import torch

from seme.fused_merge import _ACTIVE, FAMILY, RANK_CUTS, family_arguments, kernel_dtype, kernel_inputs, stream_keys
from seme.fused_merge import GPU_METHODS as METHODS
from seme.methods.inputs import Inputs
from seme.methods.task_vector import della_keep_probability, with_base


def available() -> bool:
    """Whether the CUDA extension is built and a GPU is visible."""
    try:
        from seme import _C_cuda  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def max_models() -> int:
    from seme import _C_cuda

    return _C_cuda.MAX_MODELS


def selection_rows(method: str, params: dict, k_models: int) -> int:
    """The cuts a merge may select, which size its selection buffers (an upper bound: the kernel
    needs no more)."""
    if method == "sce":
        return int(params["select_topk"] < 1)
    return RANK_CUTS.get(FAMILY[method][0], 0) * k_models


def della_probability(base: torch.Tensor, x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each element of x (float32, x's shape), enqueued on the current
    stream: `della_keep_probability(x - base, density, epsilon)`, in the float operations of the CPU
    kernel, so both draw the same masks. base, x: contiguous CUDA tensors of one shape and dtype."""
    from seme import _C_cuda

    if x.dim() > 2:  # rows along dimension 1, as the reference (and mergekit) ranks them
        moved = x.movedim(1, -1).shape

        def as_rows(t):  # a matrix of those rows (calling with the moved 3-D tensor would recurse forever)
            return t.movedim(1, -1).reshape(-1, moved[-1]).contiguous()

        rows = della_probability(as_rows(base), as_rows(x), density, epsilon)
        return rows.reshape(moved).movedim(-1, 1).contiguous()
    cols = x.shape[-1] if x.dim() else 1
    if cols > _C_cuda.DELLA_MAX_COLS:
        return della_keep_probability(x.float() - base.float(), density, epsilon)
    prob = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if prob.numel():
        _C_cuda.della_probability(base=base.data_ptr(), x=x.data_ptr(), prob=prob.data_ptr(), rows=x.numel() // cols,
                                  cols=cols, in_dtype=kernel_dtype(x.dtype), p0=density - epsilon, eps=epsilon,
                                  stream=torch.cuda.current_stream(x.device).cuda_stream)
    return prob


def merge(method: str, inputs: Inputs, params: dict, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Merge one tensor with the CUDA kernel, into `out_dtype`. Inputs: CUDA tensors of one shape and
    device, float32 / bfloat16 / float16 (mixed dtypes are widened to float32), 1 to 8 non-base models."""
    from seme import _C_cuda

    if method not in METHODS:
        raise ValueError(f"no fused kernel for method '{method}'")
    if kernel_dtype(out_dtype) is None:
        return merge(method, inputs, params).to(out_dtype)
    inputs = with_base(inputs)
    base, others = inputs.base, inputs.others
    if not others:
        return base.to(out_dtype)
    if len(others) > _C_cuda.MAX_MODELS:
        raise ValueError(f"the CUDA kernels take at most {_C_cuda.MAX_MODELS} non-base models")
    tensors = kernel_inputs(base, others, "cuda")
    n = base.numel()
    if n >= 2 ** 32:
        raise ValueError("the CUDA kernels take fewer than 2^32 elements")
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    if n == 0:
        return out
    rows = selection_rows(method, params, len(others))
    with torch.cuda.device(base.device):
        workspace = torch.empty(_C_cuda.workspace_bytes(n, rows), dtype=torch.uint8, device=base.device)
        common = dict(base=tensors[0].data_ptr(), others=[t.data_ptr() for t in tensors[1:]], out=out.data_ptr(),
                      n=n, in_dtype=kernel_dtype(tensors[0].dtype), out_dtype=kernel_dtype(out_dtype),
                      workspace=workspace.data_ptr(), rows=rows, stream=torch.cuda.current_stream().cuda_stream)
        if method == "sce":
            _C_cuda.sce_merge(select_topk=float(params["select_topk"]), **common)
            return out
        args = family_arguments(method, params, n, stream_keys(method, inputs.seed, inputs.name, inputs.other_indices))
        del args["epsilon"]
        probability = []  # DELLA: kept alive until the kernels have read them (the stream orders the free)
        if FAMILY[method][0] == "della_magprune":
            probability = [della_probability(tensors[0], x, d, e) if mode == _ACTIVE else None
                           for x, d, e, mode in zip(tensors[1:], params["density"], params["epsilon"], args["mode"])]
        args["prob"] = [p.data_ptr() if p is not None else 0 for p in probability] or [0] * len(others)
        _C_cuda.family_merge(**args, **common)
    return out
