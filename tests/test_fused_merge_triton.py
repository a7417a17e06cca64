"""The Triton fused task-vector kernels against the plain-torch references: on a GPU when there is one,
else on CPU through the interpreter.

Small sizes only: the interpreter runs every program in numpy. BLOCK is lowered so that even these sizes
span many blocks (equal-count offsets across blocks, the histogram's grid-stride loop).
"""
from __future__ import annotations


import pytest

import torch

from triton_device import DEVICE  # first: it sets up the interpreter where there is no GPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernel_cases import FAMILY, OPTIONS, OPTIONS_PARAMS, make_inputs, without_base  # noqa: E402
from seme.kernels import fused_merge as fm  # noqa: E402
from seme.methods import registry, rng  # noqa: E402
from seme.methods.inputs import Inputs  # noqa: E402

@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(fm, "BLOCK", 64)


def check(method, inputs, supplied):
    m = registry.get(method)
    params = registry.bind(m, supplied, len(inputs.tensors), inputs.base_index, "test")
    expected = m.fn(inputs, params)
    on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    got = fm.fused_merge(method, on_device, params).cpu()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # Identical masks, float32 rounding apart: a mask difference moves an element by a whole delta.
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


# (shape, K, dtype, tied, densities): 1, 7, 300, 2049 elements and 2-D, densities 0.01 .. 1.
CASES = [
    ((1,), 1, torch.float32, False, [0.5]),
    ((7,), 2, torch.bfloat16, True, [0.3, 1.0]),
    ((300,), 3, torch.float32, True, [0.01, 0.5, 0.9]),
    ((300,), 4, torch.bfloat16, False, [0.2, 0.7, 0.05, 1.0]),
    ((2049,), 2, torch.float32, False, [0.1, 0.6]),
    ((2049,), 3, torch.bfloat16, True, [0.25, 0.01, 0.8]),
    ((17, 33), 2, torch.float32, True, [0.4, 0.6]),
    ((17, 33), 4, torch.bfloat16, False, [0.9, 0.3, 0.5, 0.05]),
]


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_family_matches_reference(method, case):
    shape, k, dtype, tied, density = CASES[case]
    supplied = {"weight": [0.7, 0.4, 1.1, 0.25][:k], "density": density}
    if "breadcrumbs" in method:
        supplied["gamma"] = [0.05, 0.0, 0.2, 0.01][:k]
    if "della" in method:  # density ± epsilon within (0, 1), as DELLA requires
        supplied["epsilon"] = [min(e, d / 2, (1 - d) / 2) for e, d in zip([0.1, 0.3, 0.05, 0.0], density)]
    check(method, make_inputs(shape, k, dtype, tied, seed=case), supplied)


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("overrides", OPTIONS)
def test_family_options(method, overrides):
    check(method, make_inputs((300,), 3, tied=True, seed=3), {**OPTIONS_PARAMS, **overrides})


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_base", [True, False])
def test_lrp_matches_reference(case, with_base):
    shape, k, dtype, tied, density = CASES[case]
    inputs = make_inputs(shape, k, dtype, tied, seed=case)
    check("lrp", inputs if with_base else without_base(inputs),
          {"weight": [0.7, -0.4, 1.1, 0.25][:k], "density": density[0]})


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.01, 0.0])
def test_sce_matches_reference(case, topk):
    shape, k, dtype, tied, _ = CASES[case]
    check("sce", make_inputs(shape, k, dtype, tied, seed=case), {"select_topk": topk})


@pytest.mark.parametrize("topk", [0.5, 0.0])
def test_sce_of_one_model_selects_nothing(topk):
    # One model's variance is 0 everywhere: nothing to select (its keys were -0 where base and δ are
    # negative, which ranked below every other and were selected).
    check("sce", make_inputs((300,), 1, seed=1), {"select_topk": topk})


@pytest.mark.parametrize("case", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.01, 0.0])
def test_seme_fusion_reports_the_references_statistics(case, topk):
    """SeMe's Select / Compute / Erase on the SCE kernel: the reference's tensor (fp32 sums apart) and
    the same statistics: selected fraction, sign-conflict rate and η, as rounded in the report."""
    from seme.methods.seme import seme_fuse

    shape, k, dtype, tied, _ = CASES[case]
    inputs = make_inputs(shape, k, dtype, tied, seed=case)
    params = registry.bind(registry.get("seme"), {"select_topk": topk}, k + 1, inputs.base_index, "test")
    ref, ref_stats = seme_fuse(inputs, params)
    on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    got, stats = fm.seme_fuse(on_device, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), ref, rtol=2e-6, atol=1e-6)
    assert stats == ref_stats


def test_gpu_backend_runs_seme_on_the_kernel(monkeypatch):
    """The backend's GPU SeMe fusion: the kernel's tensor and statistics, the reference (None) beyond
    the kernel's model count."""
    from seme import backend
    from seme.methods.seme import seme_fuse

    inputs = make_inputs((300,), 3, tied=True, seed=2)
    params = registry.bind(registry.get("seme"), {"select_topk": 0.5}, 4, inputs.base_index, "test")
    on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    merged = backend._gpu_seme(fm)(on_device, params, torch.bfloat16)
    assert torch.equal(merged.tensor, fm.seme_fuse(on_device, params)[0])
    assert merged.stats == seme_fuse(inputs, params)[1]
    monkeypatch.setattr(fm, "MAX_MODELS", 2)
    assert backend._gpu_seme(fm)(on_device, params, torch.bfloat16) is None


@pytest.mark.parametrize("method", ["dare_ties", "ties", "sce"])
def test_gpu_backend_takes_the_reference_beyond_the_kernels_model_count(monkeypatch, method):
    """More models than the Triton kernels take (and no CUDA kernel): the reference (None), not a ValueError."""
    from seme import backend, cuda_merge

    monkeypatch.setattr(cuda_merge, "available", lambda: False)
    monkeypatch.setattr(fm, "MAX_MODELS", 2)
    inputs = make_inputs((300,), 3, tied=True, seed=2)
    params = registry.bind(registry.get(method), {} if method == "sce" else {"weight": 1.0, "density": 0.5}, 4,
                           inputs.base_index, "test")
    on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    assert backend._fused(method, torch.device("cuda"))(on_device, params, torch.float32) is None


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear", "sce"])
def test_mixed_input_dtypes(method):
    inputs = make_inputs((300,), 3, tied=True, seed=5)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float16)
    inputs = Inputs(tuple(t.to(d) for t, d in zip(inputs.tensors, dtypes)), inputs.base_index, inputs.name, 1)
    check(method, inputs, {} if method == "sce" else {"weight": [0.5, 1.0, 0.8], "density": 0.4})


@pytest.mark.parametrize("method", ["ties", "dare_linear", "sce"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes(method, out_dtype):
    # Written by the kernel, rounded to nearest even from its fp32 result (which may sit one fp32 ulp
    # from the reference's): equal to the reference's cast within one ulp of the output dtype.
    inputs = make_inputs((300,), 3, torch.bfloat16, seed=4)
    m = registry.get(method)
    params = registry.bind(m, {} if method == "sce" else {"weight": [0.5, 1.0, 0.8], "density": 0.4}, 4,
                           inputs.base_index, "test")
    on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    got = fm.fused_merge(method, on_device, params, out_dtype).cpu()
    assert got.dtype == out_dtype
    torch.testing.assert_close(got.float(), m.fn(inputs, params).to(out_dtype).float())


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties", "della", "lrp"])
def test_a_dropped_models_nonfinite_values_are_dropped_too(method):
    # density 0 drops a model: the reference adds zeros for it, whatever it holds (not NaN · 0).
    inputs = make_inputs((300,), 3, tied=True, seed=6)
    dropped = inputs.tensors[2].clone()
    dropped[[5, 77, 200]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    inputs = Inputs((inputs.tensors[0], inputs.tensors[1], dropped, inputs.tensors[3]), 1, inputs.name, inputs.seed)
    density = 0.0 if method == "lrp" else [0.4, 0.0, 0.5]
    check(method, inputs, {"weight": [0.7, 0.4, 1.1], "density": density})


@pytest.mark.parametrize("method", ["ties", "sce"])
def test_the_engine_merges_a_nonfinite_input_as_the_reference(llama_family, tmp_path, monkeypatch, method):
    # The kernels leave a NaN that sign election or selection masks out of the output, where the
    # reference (as mergekit) lets NaN * 0 through; they report no finiteness, as on a GPU, so the
    # engine scans the inputs and, with --allow-nonfinite, writes the reference's tensor.
    import seme
    from conftest import load_folder, with_bad_element
    from seme import backend, engine
    from seme.errors import SemeError

    broken = "model.layers.1.mlp.up_proj.weight"
    bad = with_bad_element(llama_family["expert0"], tmp_path / "bad", broken, float("nan"))
    recipe = {"merge_method": method, "base_model": llama_family["base"], "models": [{"model": bad},
              {"model": llama_family["expert1"]}], "parameters": {"weight": 1.0, "density": 0.4, "select_topk": 0.5}}
    if method == "sce":
        del recipe["parameters"]["weight"], recipe["parameters"]["density"]
    else:
        del recipe["parameters"]["select_topk"]
    kernel_outputs = []

    def triton_kernel(name, device):
        def merge(inputs, params, out_dtype):
            if inputs.name != broken:
                return None  # the reference: the interpreter is slow
            on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name,
                               inputs.seed)
            kernel_outputs.append(fm.fused_merge(name, on_device, params, out_dtype).cpu())
            return backend.Merged(kernel_outputs[-1])
        return merge

    monkeypatch.setattr(backend, "_fused", triton_kernel)
    monkeypatch.setattr("seme.executor.make_engine", lambda plan, device, name, world, allow_nonfinite:
                        engine.TorchEngine(plan, device, name, allow_nonfinite=allow_nonfinite))
    with pytest.raises(SemeError, match=f"input tensor '{broken}' of bad contains NaN or Inf"):
        seme.merge(recipe, str(tmp_path / "refused"), backend="fused")
    seme.merge(recipe, str(tmp_path / "fused"), backend="fused", allow_nonfinite=True)
    seme.merge(recipe, str(tmp_path / "reference"), backend="reference", allow_nonfinite=True)
    merged, expected = load_folder(tmp_path / "fused"), load_folder(tmp_path / "reference")
    # the kernel's own tensor is not the reference's: ties' is finite, SCE's NaN in whole blocks
    assert len(kernel_outputs) == 2 and not torch.equal(kernel_outputs[1].isnan(), expected[broken].isnan())
    assert merged.keys() == expected.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("payload", [0x7FC00000, 0x7FFFFFFF, -1])  # -1: 0xFFFFFFFF
def test_nan_written_to_bfloat16_stays_nan(payload):
    # A GPU's arithmetic gives NaN as 0x7FFFFFFF, which rounding the bits by hand carried into -0.
    inputs = make_inputs((300,), 2, seed=7)
    x = inputs.tensors[0].clone()
    x.view(torch.int32)[[3, 150]] = payload
    inputs = Inputs((x, *inputs.tensors[1:]), inputs.base_index, inputs.name, inputs.seed)
    params = registry.bind(registry.get("task_arithmetic"), {"weight": 1.0}, 3, 1, "test")
    on_device = Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    got = fm.fused_merge("task_arithmetic", on_device, params, torch.bfloat16).cpu()
    expected = registry.get("task_arithmetic").fn(inputs, params).to(torch.bfloat16)
    assert got.isnan().sum() == 2
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_default_block_size(monkeypatch):
    monkeypatch.setattr(fm, "BLOCK", 1024)
    for method in ("ties", "breadcrumbs_ties", "dare_ties", "della"):
        check(method, make_inputs((2049,), 3, tied=True), {"weight": 1.0, "density": 0.3})
    check("sce", make_inputs((2049,), 3, tied=True), {"select_topk": 0.3})


def test_degenerate_inputs():
    base = torch.randn(5, device=DEVICE)
    only_base = Inputs((base,), base_index=0)
    assert fm.fused_merge("ties", only_base, {}) is base  # nothing to merge: the reference returns base
    empty = Inputs((torch.empty(0, 3, device=DEVICE), torch.empty(0, 3, device=DEVICE)), base_index=0)
    params = registry.bind(registry.get("ties"), {"weight": 1.0, "density": 0.5}, 2, 0, "test")
    assert fm.fused_merge("ties", empty, params).shape == (0, 3)
    with pytest.raises(ValueError):
        fm.fused_merge("slerp", only_base, {})


@triton.jit
def _philox_probe(out_ptr, keys_ptr, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    k0 = tl.load(keys_ptr).to(tl.uint32)
    k1 = tl.load(keys_ptr + 1).to(tl.uint32)
    words = fm._philox_words(start, k0, k1, BLOCK)
    tl.store(out_ptr + start + tl.arange(0, BLOCK), words.to(tl.int64))


@pytest.mark.parametrize("key", [0, rng.stream_key(3, "model.embed_tokens.weight", 2), 0xFFFFFFFFFFFFFFFF])
def test_kernel_philox_bits_equal_reference(key):
    n = 96  # three programs: block starts other than 0
    out = torch.empty(n, dtype=torch.int64, device=DEVICE)
    _philox_probe[(3,)](out, torch.tensor([key & 0xFFFFFFFF, key >> 32], device=DEVICE), BLOCK=32)
    assert torch.equal(out.cpu(), rng.philox4x32(key, torch.arange(n // 4)).reshape(-1))


@triton.jit
def _variance_probe(out_ptr, xs, b_ptr, n, K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    tl.store(out_ptr + offs, fm._variance(xs, base, offs, m, K), mask=m)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_kernel_variance_bits_equal_torch_var(k):
    # SCE ranks the variance bits: they must be torch.var's (CPU), not merely close (nor -0 for +0).
    g = torch.Generator().manual_seed(k)
    n = 2000
    base = torch.randn(n, generator=g)
    scales = [10.0 ** torch.randint(-4, 2, (n,), generator=g) for _ in range(k)]  # mixed magnitudes
    xs = tuple(base + torch.randn(n, generator=g) * s for s in scales)
    out = torch.empty(n, device=DEVICE)
    _variance_probe[(triton.cdiv(n, 512),)](out, tuple(x.to(DEVICE) for x in xs), base.to(DEVICE), n, K=k, BLOCK=512)
    expected = torch.var(torch.stack([x - base for x in xs]), dim=0, unbiased=False)
    assert torch.equal(out.cpu().view(torch.int32), expected.view(torch.int32))
