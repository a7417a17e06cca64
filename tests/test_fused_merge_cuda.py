"""The CUDA C++ kernels (seme._C_cuda) against the plain-torch references, on a GPU when one is
present (skipped otherwise); the extension itself must build wherever nvcc is found."""
from __future__ import annotations

import importlib
import os
import shutil

import pytest

import torch

from kernel_cases import FAMILY, OPTIONS, OPTIONS_PARAMS, make_inputs, without_base
from seme.methods import registry
from seme.methods.inputs import Inputs
from seme.methods.task_vector import della_keep_probability

@pytest.mark.skipif(not shutil.which("nvcc") or bool(os.environ.get("SEME_NO_CUDA")), reason="no nvcc")
def test_extension_is_built_where_nvcc_is():
    module = importlib.import_module("seme._C_cuda")  # imports without a GPU: the runtime is linked statically
    assert module.MAX_MODELS == 8 and module.workspace_bytes(1 << 20, 0) > 0


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def rows(n):
    """n elements, as rows of 64 where they divide (DELLA ranks along rows)."""
    return (n // 64, 64) if n % 64 == 0 else (n,)


def check(method, inputs, supplied, out_dtype=torch.float32):
    from seme import cuda_merge

    m = registry.get(method)
    params = registry.bind(m, supplied, len(inputs.tensors), inputs.base_index, "test")
    expected = m.fn(inputs, params)
    on_gpu = Inputs(tuple(t.cuda() for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    got = cuda_merge.merge(method, on_gpu, params, out_dtype=out_dtype).cpu()
    assert got.dtype == out_dtype and got.shape == expected.shape
    if out_dtype == torch.float32:
        # Identical masks, float32 rounding apart: a mask difference moves an element by a whole delta.
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)
    else:  # the kernel's rounding of its fp32 result, which may sit one fp32 ulp from the reference's
        torch.testing.assert_close(got.float(), expected.to(out_dtype).float())


# (elements, K, dtype, tied, densities): the odd sizes, 1-8 models, every dtype, ties.
CASES = [
    (1, 1, torch.float32, False, [0.5]),
    (7, 2, torch.bfloat16, True, [0.3, 1.0]),
    (1023, 3, torch.float16, True, [0.01, 0.5, 0.9]),
    (1023, 8, torch.float32, False, [0.2, 0.7, 0.05, 1.0, 0.3, 0.3, 0.6, 0.1]),
    (4096, 4, torch.bfloat16, True, [0.25, 0.01, 0.8, 0.5]),
    ((1 << 20) + 3, 3, torch.bfloat16, False, [0.1, 0.6, 0.3]),
    ((1 << 20) + 3, 2, torch.float32, True, [0.4, 0.6]),
    (1 << 18, 5, torch.float16, False, [0.9, 0.3, 0.5, 0.05, 1.0]),
]


@gpu
@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_family_matches_reference(method, case):
    n, k, dtype, tied, density = CASES[case]
    supplied = {"weight": [0.7, 0.4, 1.1, 0.25, 0.5, 0.9, 0.3, 0.6][:k], "density": density}
    if "breadcrumbs" in method:
        supplied["gamma"] = [0.05, 0.0, 0.2, 0.01, 0.1, 0.0, 0.02, 0.05][:k]
    if "della" in method:  # density ± epsilon within (0, 1), as DELLA requires
        supplied["epsilon"] = [min(e, d / 2, (1 - d) / 2) for e, d in zip([0.1, 0.3, 0.05, 0.0, 0.1, 0.1, 0.2, 0.05], density)]
    check(method, make_inputs(rows(n), k, dtype, tied, seed=case), supplied)


@gpu
@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("overrides", OPTIONS)
def test_family_options(method, overrides):
    check(method, make_inputs(rows(3000), 3, torch.float32, True, seed=3), {**OPTIONS_PARAMS, **overrides})


@gpu
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_base", [True, False])
def test_lrp_matches_reference(case, with_base):
    n, k, dtype, tied, density = CASES[case]
    inputs = make_inputs(rows(n), k, dtype, tied, seed=case)
    check("lrp", inputs if with_base else without_base(inputs),
          {"weight": [0.7, -0.4, 1.1, 0.25, 0.5, 0.9, 0.3, 0.6][:k], "density": density[0]})


@gpu
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.01, 0.0])
def test_sce_matches_reference(case, topk):
    n, k, dtype, tied, _ = CASES[case]
    check("sce", make_inputs(rows(n), k, dtype, tied, seed=case), {"select_topk": topk})


@gpu
@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties", "sce"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes(method, out_dtype):
    supplied = {} if method == "sce" else {"weight": [0.5, 1.0, 0.8], "density": 0.4}
    check(method, make_inputs(rows(5000), 3, torch.bfloat16, False, seed=4), supplied, out_dtype)


@gpu
def test_misaligned_and_mixed_inputs():
    # A view that starts one element in: the kernels fall back to unvectorized loads.
    inputs = make_inputs(rows(4097), 3, torch.float32, True, seed=8)
    shifted = Inputs(tuple(t[1:] for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    check("ties", shifted, {"weight": 1.0, "density": 0.3})
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float16)
    mixed = Inputs(tuple(t.to(d) for t, d in zip(inputs.tensors, dtypes)), inputs.base_index, inputs.name, 1)
    check("dare_ties", mixed, {"weight": [0.5, 1.0, 0.8], "density": 0.4})


@gpu
def test_refuses_what_it_cannot_take():
    from seme import cuda_merge

    inputs = make_inputs(rows(64), 9, torch.float32, False, seed=0)
    params = registry.bind(registry.get("ties"), {"weight": 1.0, "density": 0.5}, 10, 1, "test")
    with pytest.raises(ValueError, match="at most 8"):
        cuda_merge.merge("ties", Inputs(tuple(t.cuda() for t in inputs.tensors), 1), params)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_merge.merge("ties", Inputs(inputs.tensors[:3], 1), registry.bind(
            registry.get("ties"), {"weight": 1.0, "density": 0.5}, 3, 1, "test"))


@gpu
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_buffered_and_slow_cuts_in_one_launch(method):
    """One model's magnitudes pile on four values, so its level-0 bin outgrows the selection buffer
    and its cut is finished on the full data; the other models' cuts are read off their buffers."""
    g = torch.Generator().manual_seed(11)
    n = 1 << 17
    base = torch.randint(-8, 8, (n,), generator=g).float() * 0.5
    tied = base + torch.randint(-3, 4, (n,), generator=g).float()  # exact: |δ| in {0, 1, 2, 3}
    smooth = [base + 0.1 * torch.randn(n, generator=g) for _ in range(2)]
    inputs = Inputs((tied, base, *smooth), base_index=1, name="model.layers.0.mlp.w", seed=3)
    supplied = {"weight": [0.7, 0.4, 1.1], "density": [0.3, 0.5, 0.2]}
    if "breadcrumbs" in method:
        supplied["gamma"] = [0.1, 0.05, 0.0]
    check(method, inputs, supplied)


@gpu
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "sce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_collect_places_each_block_at_its_offset(method, dtype):
    """4M elements, so each level-0 block strides over many tiles, with magnitudes spread over 12
    octaves along the tensor, so the blocks hold different counts of a cut's level-0 bin. Each
    block must write its entries at the offset that the per-block counts of level 0 give it."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(1 << 12, 1 << 10, generator=g)
    ramp = torch.logspace(-6, 6, 1 << 12, base=2.0).unsqueeze(1)
    others = [base + 0.01 * ramp * torch.randn(base.shape, generator=g) for _ in range(4)]
    inputs = Inputs(tuple(t.to(dtype) for t in (base, *others)), 0, "model.layers.0.mlp.w", 5)
    supplied = {"select_topk": 0.3} if method == "sce" else {"weight": [0.7, 0.4, 1.1, 0.5],
                                                           "density": [0.3, 0.5, 0.2, 0.4]}
    if "breadcrumbs" in method:
        supplied["gamma"] = [0.1, 0.05, 0.02, 0.01]
    check(method, inputs, supplied)


# Row lengths 1, 7, 64, 4096 and 16384 (the longest the kernel sorts), then longer rows that torch
# sorts; 1 to several hundred rows; 0-d, 1-d and 3-d tensors.
DELLA_SHAPES = [(), (1,), (300, 1), (7,), (257, 7), (64,), (5, 9, 64), (4096,), (130, 4096), (16384,), (3, 16384),
                (20000,), (3, 20000)]


def della_rows(shape, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":  # |δ| from {0, 1/8, 2/8, 3/8}: long runs of equal keys, exact in every dtype
        base = torch.randint(-8, 8, shape, generator=g).float() * 0.5
        x = base + torch.randint(-3, 4, shape, generator=g).float() / 8
    elif kind == "tiny":  # fp16 subnormals: their fp32 keys use the low mantissa bits
        base = torch.zeros(shape)
        x = 1e-6 * torch.randn(shape, generator=g)
    else:
        base = torch.randn(shape, generator=g)
        x = base + 0.01 * torch.randn(shape, generator=g)
    return base.to(dtype), x.to(dtype)


def test_della_probability_of_fused_experts_ranks_along_dimension_1():
    """[E, in, out] ranks along dimension 1 (rows past DELLA_MAX_COLS are ranked by torch: no GPU needed)."""
    from seme import cuda_merge

    cuda = pytest.importorskip("seme._C_cuda")
    base, x = della_rows((2, cuda.DELLA_MAX_COLS + 1, 3), torch.float32, "smooth", seed=1)
    assert torch.equal(cuda_merge.della_probability(base, x, 0.4, 0.1), della_keep_probability(x - base, 0.4, 0.1))


@gpu
@pytest.mark.parametrize("shape", DELLA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["smooth", "tied", "tiny"])
def test_della_probability_matches_reference(shape, dtype, kind):
    """The probabilities (ranks through the CUDA row sort, or torch's beyond DELLA_MAX_COLS) equal
    the CPU reference's bit for bit: the reference's float32 operations, divisions included. With
    ε = 0.1 every rank of a row has its own probability, so this checks the ranks as well."""
    from seme import cuda_merge

    base, x = della_rows(shape, dtype, kind, seed=sum(shape))
    density, epsilon = 0.4, 0.1
    expected = della_keep_probability(x.float() - base.float(), density, epsilon)
    got = cuda_merge.della_probability(base.cuda(), x.cuda(), density, epsilon).cpu()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
