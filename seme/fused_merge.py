"""Fused CPU kernels (seme._C, C++/OpenMP) for the task-vector family, SCE, linear, SLERP and RAM.

`merge(method, inputs, params)` is a drop-in for `registry.get(method).fn(inputs, params)` on CPU
tensors (same `Inputs`, same bound params): the same masks (exact rank selection with the
(value, index) tie rule, the same Philox draws), fp32 results equal up to the rounding of the L1
and energy sums, without the [K, n] intermediates, and optionally cast straight to `out_dtype`.
With `checks=True` it also says whether the inputs and the output were finite, seen in passing by
the element pass (csrc/cpu/fused_merge.h, `Finite`), so that the engine needs no pass of its own.
"""
from __future__ import annotations

import math
import struct

from seme.methods import rng
from seme.methods.inputs import Inputs, all_finite
from seme.methods.task_vector import family_params, with_base

MAX_ELEMENTS = 2 ** 32  # the kernels index elements in 32 bits: larger tensors take the reference
# safetensors dtype code -> the kernels' dtype code (csrc/cpu/fused_merge.h, csrc/cuda/fused_merge.h).
KERNEL_DTYPES = {"F32": 0, "BF16": 1, "F16": 2}
_TORCH_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_NONE, _RANK, _RANDOM, _DELLA = 0, 1, 2, 3
_KEEP, _DROP, _ACTIVE = 0, 1, 2

# method -> (sparsification as named in task_vector.sparsify, sign consensus)
FAMILY = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_ties": ("random", True),
    "dare_linear": ("random", False),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
    "della": ("della_magprune", True),
    "della_linear": ("della_magprune", False),
    "lrp": ("magnitude", False),
}
GPU_METHODS = frozenset(FAMILY) | {"sce"}  # also in the CUDA and Triton kernels
# also in the Triton kernels (seme.kernels.linear_merge), which the GPU runs them on: no CUDA C++ kernel
TRITON_ONLY_METHODS = frozenset({"linear", "slerp", "model_stock", "ram", "ramplus_tl"})
METHODS = GPU_METHODS | TRITON_ONLY_METHODS
_KERNEL = {None: _NONE, "magnitude": _RANK, "magnitude_outliers": _RANK, "random": _RANDOM,
           "della_magprune": _DELLA}
RANK_CUTS = {"magnitude": 1, "magnitude_outliers": 2}  # rank cuts a sparsification selects per model


def available() -> bool:
    """Whether the native extension is built."""
    try:
        from seme import _C  # noqa: F401
    except ImportError:
        return False
    return True


def covers(method: str, params: dict, shape: tuple[int, ...]) -> bool:
    """Whether the CPU kernels merge `method` with these bound parameters on a tensor of `shape`: not
    Model Stock's filter-wise ratios (one per row), which the reference computes, nor what
    `ranks_along_rows` excludes."""
    return (method in METHODS and not (method == "model_stock" and params["filter_wise"])
            and ranks_along_rows(method, shape))


def ranks_along_rows(method: str, shape: tuple[int, ...]) -> bool:
    """Whether the kernels (CPU and GPU) rank `method`'s elements as mergekit does on `shape`: they rank
    DELLA's along contiguous rows, mergekit along dimension 1, which for 3 or more dimensions (fused
    experts' [E, in, out]) is not the last."""
    return not (method.startswith("della") and len(shape) > 2)


def kernel_dtype(dtype) -> int | None:
    """The kernels' code of a torch dtype, or None where they do not take it."""
    code = _TORCH_CODES.get(str(dtype).removeprefix("torch."))
    return None if code is None else KERNEL_DTYPES[code]


def merge(method: str, inputs: Inputs, params: dict, *, out_dtype=None, num_threads: int = 0, checks: bool = False):
    """Merge one tensor with the fused kernel, into `out_dtype`; `num_threads=0` uses OpenMP's default.
    With `checks`, returns (tensor, inputs finite, output finite) instead of the tensor; "inputs
    finite" is False for any NaN or Inf input, and rarely for a difference of inputs that overflows.

    Inputs: CPU tensors of one shape, float32 / bfloat16 / float16 (mixed dtypes are widened to
    float32 first, which is exact; float64 raises TypeError); fewer than 2^32 elements.
    """
    import torch

    shape = tuple(inputs.tensors[0].shape)
    if not covers(method, params, shape):
        raise ValueError(f"no fused kernel for method '{method}' with {params} on shape {list(shape)}")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if kernel_dtype(out_dtype) is None:  # the kernel writes fp32, bf16 or fp16; anything else is a cast of fp32
        merged = merge(method, inputs, params, num_threads=num_threads, checks=checks)
        if not checks:
            return merged.to(out_dtype)
        out = merged[0].to(out_dtype)
        return out, merged[1], merged[2] and all_finite(out)
    if method == "linear":  # no base: the first model takes its place
        base, others = inputs.tensors[0], inputs.tensors[1:]
    else:
        inputs = with_base(inputs)
        base, others = inputs.base, inputs.others
    if not others and method != "linear":  # one model's linear merge is still w·x (/ w)
        out = base.to(out_dtype)
        return (out, all_finite(base), all_finite(out)) if checks else out
    tensors = kernel_inputs(base, others, "cpu")
    n = base.numel()
    out = torch.empty(base.shape, dtype=out_dtype)
    if n == 0:
        return (out, True, True) if checks else out
    finite = launch(method, params, base=tensors[0].data_ptr(), others=[t.data_ptr() for t in tensors[1:]],
                    out=out.data_ptr(), shape=tuple(base.shape), in_dtype=kernel_dtype(tensors[0].dtype),
                    out_dtype=kernel_dtype(out_dtype), keys=stream_keys(method, inputs.seed, inputs.name, inputs.other_indices),
                    num_threads=num_threads)
    return (out, *finite) if checks else out


def seme_fuse(inputs: Inputs, params: dict):
    """SeMe's Select / Compute / Erase (METHOD §5) on the SCE kernel, with the statistics SeMe reports
    (as `seme.methods.seme.seme_fuse` gives them): (float32 tensor, statistics, inputs finite).

    Inputs as for `merge`: the pivot as base, the aligned sources as others, on the CPU."""
    import torch

    from seme import _C
    from seme.methods.seme import fusion_stats

    base, others = inputs.base, inputs.others
    tensors = kernel_inputs(base, others, "cpu")
    n = base.numel()
    out = torch.empty(base.shape, dtype=torch.float32)
    if n == 0:
        return out, fusion_stats(0, 0, 0, [1 / len(others)] * len(others)), True
    inputs_finite, _, eta, selected, conflicts = _C.sce_merge(
        base=tensors[0].data_ptr(), others=[t.data_ptr() for t in tensors[1:]], out=out.data_ptr(), n=n,
        in_dtype=kernel_dtype(tensors[0].dtype), out_dtype=KERNEL_DTYPES["F32"], select_topk=float(params["select_topk"]),
        with_stats=True)
    return out, fusion_stats(n, selected, conflicts, eta), inputs_finite


def launch(method: str, params: dict, *, base: int, others: list[int], out: int, shape: tuple[int, ...],
           in_dtype: int, out_dtype: int, keys: list[int], num_threads: int = 0) -> tuple[bool, bool]:
    """The C++ kernel on raw addresses (no torch needed): `base` and `others` hold `shape` elements
    of `in_dtype`, `out` receives them in `out_dtype` (KERNEL_DTYPES codes); `keys` are the random
    streams of the others (`stream_keys`). Returns (inputs finite, output finite)."""
    from seme import _C

    n = math.prod(shape)
    common = dict(base=base, others=others, out=out, n=n, in_dtype=in_dtype, out_dtype=out_dtype,
                  num_threads=num_threads)
    if method == "sce":
        return _C.sce_merge(select_topk=float(params["select_topk"]), **common)
    if method == "linear":
        return _C.linear_merge(weight=list(params["weight"]), normalize=params["normalize"], **common)
    if method in ("slerp", "model_stock"):  # a Gram matrix in one pass, then a linear merge by its coefficients
        g = _C.gram(base=base, others=others, n=n, in_dtype=in_dtype, deltas=method == "model_stock",
                    num_threads=num_threads)
        size = math.isqrt(len(g))
        gram = [g[i * size:(i + 1) * size] for i in range(size)]
        return _C.linear_merge(weight=_linear_weights(method, params, gram), normalize=False, **common)
    if method in ("ram", "ramplus_tl"):
        scale = [1.0] * len(others)
        if method == "ramplus_tl":
            unique, shared = _C.ram_counts(base=base, others=others, n=n, in_dtype=in_dtype,
                                           epsilon=params["epsilon"], num_threads=num_threads)
            scale = ramplus_scales(unique, shared, params["r"], params["alpha"])
        return _C.ram_merge(epsilon=params["epsilon"], scale=scale, **common)
    return _C.family_merge(cols=shape[-1] if len(shape) >= 2 else n,  # DELLA ranks along rows
                           **family_arguments(method, params, n, keys), **common)


def _linear_weights(method: str, params: dict, gram: list[list[float]]) -> list[float]:
    """The weights of [base, *others] in a SLERP (Gram of the inputs) or Model Stock (Gram of the task
    vectors) merge, by the rules their references follow."""
    if method == "slerp":
        from seme.methods.slerp import _NORM_EPS, slerp_coefficients

        na, nb = (math.sqrt(v) if math.sqrt(v) > _NORM_EPS else 1.0 for v in (gram[0][0], gram[1][1]))
        return list(slerp_coefficients(params["t"], gram[0][1] / (na * nb)))
    from seme.methods.model_stock import interpolation_ratio

    k = len(gram)
    norms = [math.sqrt(gram[i][i]) for i in range(k)]
    cosines = [min(max(gram[i][j] / max(norms[i] * norms[j], 1e-6), -1.0), 1.0)
               for i in range(k) for j in range(i + 1, k)]
    t = interpolation_ratio(sum(cosines) / len(cosines), k)
    return [1 - t] + [t / k] * k


def ramplus_scales(unique: list[int], shared: list[int], r: float, alpha: float) -> list[float]:
    """RAM+'s scale of each model's unique changes, 1 + r * clamp(shared / unique, 0, alpha), in fp32
    step by step as the reference computes it (seme.methods.ram)."""
    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    scales = []
    for u, s in zip(unique, shared):
        ratio = min(max(f32(f32(s) / f32(max(u, 1))), 0.0), f32(alpha))
        scales.append(f32(1.0 + f32(f32(r) * ratio)))
    return scales


def stream_keys(method: str, seed: int, name: str, others) -> list[int]:
    """The random stream of each non-base input (DARE / DELLA draws), by its index among the inputs;
    zeros where `method` draws nothing (a key is hashed byte by byte in Python: ~14 us, per model and tensor)."""
    if FAMILY.get(method, (None,))[0] not in ("random", "della_magprune"):
        return [0] * len(others)
    return [rng.stream_key(seed, name, i) for i in others]


def kernel_inputs(base, others, device_type: str) -> list:
    """Base and others as the native kernels take them: contiguous, of one shape, on one device of
    `device_type`, in one of the kernels' dtypes (mixed dtypes are widened to float32: exact)."""
    tensors = [t.contiguous() for t in (base, *others)]
    if any(t.device.type != device_type or t.device != base.device for t in tensors):
        raise ValueError(f"the fused {device_type} kernel takes {device_type.upper()} tensors on one device")
    if any(t.shape != base.shape for t in tensors):
        raise ValueError("all inputs must have the shape of the base")
    unsupported = [t.dtype for t in tensors if kernel_dtype(t.dtype) is None]
    if unsupported:
        raise TypeError(f"fused merge takes float32, bfloat16 or float16 inputs, not {unsupported[0]}")
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.float() for t in tensors]
    return tensors


def family_arguments(method: str, params: dict, n: int, keys: list[int]) -> dict:
    """The per-model tables both native kernels take (seme._C, seme._C_cuda), from bound params and
    the others' random streams."""
    sparsification, consensus = FAMILY[method]
    params = family_params(method, params)
    density = params["density"]
    k_models = len(density)
    gamma = params.get("gamma", [0.0] * k_models)
    epsilon = params.get("epsilon", [0.0] * k_models)
    mode, lo, hi, p0 = [], [], [], []
    for d, g, e in zip(density, gamma, epsilon):
        # The same integer arithmetic as task_vector.magnitude_mask / outlier_band_mask.
        mode.append(_KEEP if sparsification is None or d >= 1 else _DROP if d <= 0 else _ACTIVE)
        if sparsification == "magnitude":
            lo.append(n - max(1, int(d * n)))
            hi.append(n)
        elif sparsification == "magnitude_outliers":
            keep = int(d * n)
            lo.append(max(0, n - keep - int(g * n)))
            hi.append(lo[-1] + keep)
        else:
            lo.append(0)
            hi.append(n)
        p0.append(d - e if sparsification == "della_magprune" else d)
    return dict(sparsify=_KERNEL[sparsification], consensus=consensus, normalize=params["normalize"],
                rescale=params["rescale"], lambda_=params["lambda"], mode=mode, weight=list(params["weight"]),
                rank_lo=lo, rank_hi=hi, p0=p0, epsilon=list(epsilon),
                key=keys)
