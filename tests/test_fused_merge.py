"""The fused C++ kernel (seme._C via seme.fused_merge) against the plain-torch references."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from seme import fused_merge
from seme.methods import registry, rng
from seme.methods.inputs import Inputs

pytestmark = pytest.mark.skipif(not fused_merge.available(), reason="seme._C is not built")

FAMILY_PARAMS = {  # per method: a few parameter sets (scalars broadcast, lists per model)
    "task_arithmetic": [dict(weight=0.7), dict(weight=[0.5, -1.5, 2.0], normalize=True, **{"lambda": 0.8})],
    "ties": [dict(weight=1.0, density=0.3), dict(weight=[0.4, 1.0, 0.7], density=[0.01, 0.6, 1.0]),
             dict(weight=[1.0, -0.5, 2.0], density=[0.5, 0.0, 0.2], rescale=True, normalize=False)],
    "dare_ties": [dict(weight=1.0, density=0.3), dict(weight=[0.4, 1.0, 0.7], density=[0.05, 0.9, 1.0])],
    "dare_linear": [dict(weight=[0.4, 1.0, 0.7], density=0.5, normalize=True),
                    dict(weight=1.0, density=[0.2, 0.0, 0.7], rescale=False)],
    "breadcrumbs": [dict(weight=1.0, density=0.5, gamma=0.05),
                    dict(weight=[0.3, 1.0, 0.9], density=[0.9, 0.01, 0.4], gamma=[0.0, 0.5, 0.1], rescale=True)],
    "breadcrumbs_ties": [dict(weight=1.0, density=0.4, gamma=0.2)],
    "della": [dict(weight=1.0, density=0.5, epsilon=0.1), dict(weight=[0.4, 1.0, 0.7], density=[0.2, 0.8, 1.0]),
              dict(weight=[0.4, 1.0, 0.7], density=[0.0, 0.6, 0.3], epsilon=0.2)],
    "della_linear": [dict(weight=[0.4, 1.0, 0.7], density=0.4, epsilon=0.3, normalize=True)],
    "lrp": [dict(), dict(weight=[0.4, 1.0, -0.7], density=0.01), dict(weight=[1.0, -0.5, 2.0], density=1.0)],
    "sce": [dict(select_topk=1.0), dict(select_topk=0.3), dict(select_topk=0.01), dict(select_topk=0.0)],
}
CASES = [(name, i) for name, sets in FAMILY_PARAMS.items() for i in range(len(sets))]


def make_inputs(shape, k, kind="normal", dtype=torch.float32, seed=0, name="model.layers.0.w"):
    """Base and k fine-tunes; kind 'ties' draws from a small integer set (many equal |δ|)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        tensors = [torch.randint(-3, 4, shape, generator=g).float() * 0.25 for _ in range(k + 1)]
    else:
        base = torch.randn(shape, generator=g)
        tensors = [base] + [base + torch.randn(shape, generator=g) * float(torch.rand(1, generator=g)) for _ in range(k)]
    return Inputs(tuple(t.to(dtype) for t in tensors), base_index=0, name=name, seed=seed)


def bound(name, params, k):
    method = registry.get(name)
    params = {key: (value[:k] if isinstance(value, list) else value) for key, value in params.items()}
    return registry.bind(method, params, k + 1, 0, "test")


def reference(name, inputs, params, dtype=None):
    if dtype is not None:
        inputs = Inputs(tuple(t.to(dtype) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)
    return registry.get(name).fn(inputs, params)


def assert_matches(name, inputs, params):
    """fp32: the same kept elements, values equal up to the rounding of the L1 / energy sums."""
    ref = reference(name, inputs, params).float()
    out = fused_merge.merge(name, inputs, params)
    base = inputs.base.float()
    assert torch.equal(out != base, ref != base), "different elements changed: masks differ"
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("name,case", CASES)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (33, 31), (40009,)])  # the last past a selection among
@pytest.mark.parametrize("kind", ["normal", "ties"])                       # every key: the histogram passes
def test_matches_reference(name, case, shape, kind):
    k = 3
    assert_matches(name, make_inputs(shape, k, kind, seed=len(shape) + shape[0]), bound(name, FAMILY_PARAMS[name][case], k))


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_of_one_model_is_its_weighted_copy(normalize):
    inputs = make_inputs((1023,), 0)
    params = registry.bind(registry.get("linear"), dict(weight=0.7, normalize=normalize), 1, None, "test")
    assert torch.equal(fused_merge.merge("linear", inputs, params), reference("linear", inputs, params))


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_lrp_without_a_base_merges_the_models_themselves(density, kind):
    inputs = make_inputs((33, 31), 3, kind, seed=2)
    inputs = Inputs(inputs.tensors, None, inputs.name, inputs.seed)
    params = registry.bind(registry.get("lrp"), dict(weight=[0.5, 1.0, 0.25, -0.5], density=density), 4, None, "test")
    ref = reference("lrp", inputs, params)
    assert torch.equal(fused_merge.merge("lrp", inputs, params) != 0, ref != 0)
    torch.testing.assert_close(fused_merge.merge("lrp", inputs, params), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della", "sce"])
def test_model_counts(name, k):
    params = dict(select_topk=0.4) if name == "sce" else dict(weight=[0.5 + 0.25 * i for i in range(k)], density=0.35)
    for kind in ("normal", "ties"):
        assert_matches(name, make_inputs((61, 17), k, kind, seed=k), bound(name, params, k))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs", "della", "sce"])
def test_density_sweep(name, density):
    params = dict(select_topk=density) if name == "sce" else dict(weight=[0.6, 1.1], density=density)
    if name == "della":  # density ± epsilon within (0, 1)
        params["epsilon"] = 0.005
    for kind in ("normal", "ties"):
        assert_matches(name, make_inputs((4099,), 2, kind, seed=int(density * 100)), bound(name, params, 2))


@pytest.mark.parametrize("name,params", [
    ("ties", dict(weight=1.0, density=0.2)),
    ("sce", dict(select_topk=0.25)),
    ("dare_ties", dict(weight=[0.5, 1.0], density=0.3)),
    ("breadcrumbs_ties", dict(weight=1.0, density=0.4, gamma=0.1, rescale=True)),
    ("della_linear", dict(weight=1.0, density=0.4)),
])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_large_odd_size(name, params, kind):
    """17 chunks: ties spread over chunks, SCE's large-bin path (integer data), 1 vs 2 threads."""
    inputs, params = make_inputs((2**20 + 3,), 2, kind, seed=5), bound(name, params, 2)
    assert_matches(name, inputs, params)
    assert torch.equal(fused_merge.merge(name, inputs, params, num_threads=1), fused_merge.merge(name, inputs, params))


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_sce_many_models_large(kind):
    """Nine models through the bracketed pass (2^18 elements and more), its bin's energies summed per model."""
    inputs, params = make_inputs((2**18 + 5,), 9, kind, seed=9), bound("sce", dict(select_topk=0.3), 9)
    assert_matches("sce", inputs, params)


@pytest.mark.parametrize("pattern", ["sample-misses", "bracket-overflows"])
@pytest.mark.parametrize("name,params", [("ties", dict(weight=1.0, density=0.3)),
                                         ("breadcrumbs", dict(weight=1.0, density=0.3, gamma=0.05)),
                                         ("sce", dict(select_topk=0.3))])
def test_selection_where_the_strided_sample_misleads(pattern, name, params):
    """Large inputs take their cuts from one pass bracketed by a strided sample of 2^14 keys (|δ| or
    SCE's variances; every 64th element here). Data arranged against that sample makes the bracket
    miss its rank, or hold most elements: the histogram passes then decide, with the same exact
    result."""
    n = 2**20
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g)
    if pattern == "sample-misses":  # the sampled deltas are all tiny
        delta = torch.randn(n, generator=g)
        delta[::64] *= 1e-3
    else:  # the sample is spread out, every other delta sits near the cut
        delta = 0.7 + 1e-4 * torch.randn(n, generator=g)
        delta[::64] = torch.rand(n // 64, generator=g)
    inputs = Inputs((base, base + delta, base - 0.5 * delta), base_index=0, name="w", seed=1)
    assert_matches(name, inputs, bound(name, params, 2))


def test_della_rows():
    """DELLA ranks along the last dimension: rows of length 1, short rows. A tensor of 3 or more
    dimensions, which mergekit ranks along dimension 1, is the reference's."""
    params = bound("della", dict(weight=1.0, density=0.5, epsilon=0.2), 2)
    for shape in [(40, 1), (2, 300)]:
        for kind in ("normal", "ties"):
            assert_matches("della", make_inputs(shape, 2, kind), params)
    assert not fused_merge.covers("della", params, (5, 3, 9))
    with pytest.raises(ValueError, match=r"no fused kernel for method 'della' .* on shape \[5, 3, 9\]"):
        fused_merge.merge("della", make_inputs((5, 3, 9), 2), params)
    # rows whose |δ| take one value, a narrow span of keys, and the whole range (subnormal to huge):
    # the row sort takes no pass, one, and three
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (4, 300), generator=g) * 2.0 - 1.0
    magnitudes = torch.stack([torch.full((300,), 0.5), 1.0 + torch.rand(300, generator=g) * 1e-4,
                              10.0 ** (torch.rand(300, generator=g) * 70 - 40), torch.rand(300, generator=g)])
    base = torch.zeros(4, 300)  # so that δ keeps every magnitude exactly
    fine = [signs * magnitudes, signs.flip(1) * magnitudes.flip(1)]
    assert_matches("della", Inputs((base, *fine), 0), params)


@pytest.mark.parametrize("kind", ["spread", "narrow", "quantized", "clustered"])
def test_della_long_rows(kind):
    """Rows of 4096, where the kernel decides most draws from a key bucket's rank bracket: spread |δ|
    (the few undecided ones counted over the row), a span of fewer keys than buckets, and many equal
    |δ| (crowded: ranked by their index order in buckets of one key), for ε up to the widest."""
    g = torch.Generator().manual_seed(5)
    rows, cols = 6, 4096
    if kind == "spread":
        magnitudes = torch.randn(rows, cols, generator=g).abs() * 0.01
    elif kind == "narrow":
        magnitudes = 1.0 + torch.randint(0, 1500, (rows, cols), generator=g) * 2.0 ** -23
    elif kind == "quantized":  # as bf16 fine-tunes' deltas: few multiples of a few ulps, many zeros
        magnitudes = torch.randint(0, 4, (rows, cols), generator=g) * 2.0 ** torch.randint(-12, -6, (rows, cols), generator=g)
    else:
        magnitudes = (torch.randn(300, generator=g).abs() * 0.01)[torch.randint(0, 300, (rows, cols), generator=g)]
    signs = torch.randint(0, 2, (rows, cols), generator=g) * 2.0 - 1.0
    fine = [signs * magnitudes, signs.flip(1) * magnitudes.flip(1)]
    for epsilon in (0.05, 0.2, 0.499):  # 0.5 would give probabilities 0 and 1, which DELLA refuses
        params = bound("della", dict(weight=1.0, density=0.5, epsilon=epsilon), 2)
        assert_matches("della", Inputs((torch.zeros(rows, cols), *fine), 0), params)


@pytest.mark.parametrize("kind", ["bf16", "fp16", "one_mixed_bucket", "narrow_and_outlier"])
def test_della_crowded_rows(kind):
    """Crowded rows (many equal |δ|: more undecided elements than the kernel counts one by one) of
    4096. Buckets holding one key, as bf16 and fp16 fine-tunes' deltas mostly have, rank their elements
    in index order; the undecided elements of a bucket holding several keys (one exponent's two keys a
    few ulps apart, among single-key buckets) are counted among that bucket's elements, or by a count over
    the row when few; where that would read more than a sort of the row (a narrow span of keys sharing
    one bucket, the outlier widening the buckets), the row is sorted."""
    g = torch.Generator().manual_seed(7)
    rows, cols = 8, 4096
    if kind in ("bf16", "fp16"):  # δ as the kernel takes it from bf16 / fp16 inputs, in fp32
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        base = torch.randn(rows, cols, generator=g)
        fine = [(base + 0.01 * torch.randn(rows, cols, generator=g)).to(dtype).float() for _ in range(2)]
        base = base.to(dtype).float()
    else:
        if kind == "one_mixed_bucket":
            exponents = torch.randint(-8, 0, (rows, cols), generator=g)
            apart = (exponents == -3) * torch.randint(0, 2, (rows, cols), generator=g) * 2.0 ** -20
            magnitudes = 2.0 ** exponents * (1 + apart)
        else:
            magnitudes = 1.0 + torch.randint(0, 1500, (rows, cols), generator=g) * 2.0 ** -23
            magnitudes[:, 7] = 1e3
        signs = torch.randint(0, 2, (rows, cols), generator=g) * 2.0 - 1.0
        base = torch.zeros(rows, cols)
        fine = [signs * magnitudes, signs.flip(1) * magnitudes.flip(1)]
    for epsilon in (0.05, 0.2):
        params = bound("della", dict(weight=1.0, density=0.5, epsilon=epsilon), 2)
        assert_matches("della", Inputs((base, *fine), 0), params)


def test_exact_top_k_with_ties():
    """One model, weight 1: the output is the kept δ itself, k of them, the later of equal |δ|."""
    inputs = make_inputs((5000,), 1, "ties", seed=3)
    for density in (0.01, 0.3, 0.77):
        params = bound("ties", dict(weight=1.0, density=density), 1)
        out = fused_merge.merge("ties", inputs, params)
        assert torch.equal(out, reference("ties", inputs, params))
        delta = inputs.tensors[1] - inputs.base
        assert int(((out - inputs.base) != 0).sum()) == min(int(density * 5000), int((delta != 0).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,case", [("ties", 1), ("dare_ties", 0), ("della", 0), ("sce", 1), ("breadcrumbs", 1)])
def test_half_dtypes(name, case, dtype, out_dtype):
    """Half inputs / outputs: |ref64 - kernel| <= |ref64 - ref in the same dtypes| + tol."""
    inputs = make_inputs((1023,), 3, seed=11, dtype=dtype)
    params = bound(name, FAMILY_PARAMS[name][case], 3)
    ref64 = reference(name, inputs, params, torch.float64)
    ref = reference(name, inputs, params).to(out_dtype).double()
    out = fused_merge.merge(name, inputs, params, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    tol = 1e-6 * (1 + ref64.abs())
    assert bool(((ref64 - out.double()).abs() <= (ref64 - ref).abs() + tol).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,case", CASES)
def test_thread_count_independence(name, case, dtype):
    """Bit-identical for 1 and 2 threads, and between the baseline, AVX2 and AVX-512 builds (those
    this CPU runs: SEME_CPU_ISA caps the build), whatever the inputs' dtype."""
    inputs = make_inputs((3, 70001), 3, "ties" if case % 2 else "normal", dtype=dtype, seed=case)
    params = bound(name, FAMILY_PARAMS[name][case], 3)
    one = fused_merge.merge(name, inputs, params, num_threads=1)
    assert torch.equal(one, fused_merge.merge(name, inputs, params, num_threads=2))
    for isa in ISAS:
        with cpu_isa(isa):
            assert torch.equal(one, fused_merge.merge(name, inputs, params, num_threads=2)), isa


ISAS = ("baseline", "avx2", "avx512")


@contextlib.contextmanager
def cpu_isa(isa):
    os.environ["SEME_CPU_ISA"] = isa
    try:
        yield
    finally:
        del os.environ["SEME_CPU_ISA"]


def test_cpu_isa_cap():
    from seme import _C

    widest = _C.isa()
    for isa in ISAS:
        with cpu_isa(isa):  # the cap, or the widest build below it that this CPU has
            assert ISAS.index(_C.isa()) <= min(ISAS.index(isa), ISAS.index(widest))
    with cpu_isa("sse9"), pytest.raises(ValueError, match="SEME_CPU_ISA must be"):
        _C.isa()


def test_philox_words():
    from seme import _C

    for key in (0, 1, rng.stream_key(7, "model.embed_tokens.weight", 2), 2**64 - 1):
        counters = torch.tensor([0, 1, 5, 2**32 - 1, 2**32, 2**40 + 3, 2**62 + 12345], dtype=torch.int64)
        expected = rng.philox4x32(key, counters).tolist()
        assert [list(_C.philox4x32(key, int(c))) for c in counters] == expected


@pytest.mark.parametrize("isa", ISAS)
def test_dtype_conversions(isa):
    """Every bf16 / fp16 bit pattern is read exactly, by every kernel build (each has its own
    vector conversions); fp32 is rounded to them like torch does."""
    with cpu_isa(isa):
        _dtype_conversions()


def _dtype_conversions():
    for dtype in (torch.bfloat16, torch.float16):
        every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        expected = every.float()
        zeros = torch.zeros_like(every)
        for name, inputs, params in [  # the δ path (task arithmetic) and the plain one (linear)
                ("task_arithmetic", Inputs((zeros, every), 0), bound("task_arithmetic", dict(weight=1.0), 1)),
                ("linear", Inputs((every, zeros), None), registry.bind(registry.get("linear"), dict(weight=[1.0, 0.0]),
                                                                       2, None, "test"))]:
            out = fused_merge.merge(name, inputs, params)
            assert torch.equal(out.isnan(), expected.isnan()), name
            assert torch.equal(out[~out.isnan()], expected[~expected.isnan()]), name
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(100000, generator=g) * 10.0 ** torch.randint(-9, 6, (100000,), generator=g),
                        torch.tensor([0.0, 65504.0, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-40,
                                      -65520.0, 3.3895e38])])
    inputs = Inputs((values, values.clone()), 0)  # base + (x - base) * w = base exactly (for finite x)
    for dtype in (torch.bfloat16, torch.float16):
        out = fused_merge.merge("task_arithmetic", inputs, bound("task_arithmetic", dict(weight=1.0), 1),
                                out_dtype=dtype)
        assert torch.equal(out.view(torch.int16), values.to(dtype).view(torch.int16))


def test_edge_cases():
    base = torch.randn(10)
    assert torch.equal(fused_merge.merge("ties", Inputs((base,), 0), {"weight": [], "density": []}), base)
    empty = Inputs((torch.zeros(0, 4), torch.zeros(0, 4)), 0)
    assert fused_merge.merge("ties", empty, bound("ties", dict(weight=1.0, density=0.5), 1)).shape == (0, 4)
    scalar = make_inputs((), 2)
    for name in ("ties", "della", "breadcrumbs", "sce"):
        params = bound(name, dict(select_topk=0.5) if name == "sce" else dict(weight=1.0, density=0.5), 2)
        assert_matches(name, scalar, params)
    mixed = Inputs((torch.randn(50), torch.randn(50).bfloat16(), torch.randn(50).half()), 0)
    assert_matches("ties", mixed, bound("ties", dict(weight=1.0, density=0.5), 2))
    inputs, params = make_inputs((9,), 2), bound("ties", dict(weight=1.0, density=0.5), 2)
    assert torch.equal(fused_merge.merge("ties", inputs, params, out_dtype=torch.float64),
                       fused_merge.merge("ties", inputs, params).double())
    with pytest.raises(TypeError):
        fused_merge.merge("ties", make_inputs((4,), 1, dtype=torch.float64), bound("ties", dict(weight=1.0), 1))
    with pytest.raises(ValueError):
        fused_merge.merge("karcher", make_inputs((4,), 1), {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (33, 31), ((1 << 17) + 5,)])
@pytest.mark.parametrize("params", [dict(weight=[0.5, 0.3, 0.2]), dict(weight=[1.0, -0.5, 2.0], normalize=False),
                                    dict(weight=[0.25, 0.25, 0.25, 0.25])])
def test_linear_matches_reference(dtype, shape, params):
    k = len(params["weight"])
    g = torch.Generator().manual_seed(k)
    tensors = tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(k))
    inputs = Inputs(tensors, base_index=None, name="model.layers.0.w")
    bound_params = registry.bind(registry.get("linear"), params, k, None, "test")
    ref = registry.get("linear").fn(inputs, bound_params)
    # the reference's add_ may fuse the multiply-add (one rounding) where the kernel rounds twice
    torch.testing.assert_close(fused_merge.merge("linear", inputs, bound_params), ref, rtol=1e-6, atol=1e-6)
    out, inputs_finite, output_finite = fused_merge.merge("linear", inputs, bound_params, out_dtype=dtype,
                                                          checks=True)
    assert inputs_finite and output_finite and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # one ulp of the dtype where the fp32 results sit on either side of a rounding boundary
        torch.testing.assert_close(out, ref.to(dtype))


@pytest.mark.parametrize("name", ["ties", "dare_linear", "della", "sce", "task_arithmetic", "linear"])
@pytest.mark.parametrize("where", [0, 2])  # the base (first model for linear), a fine-tune
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kernels_report_nonfinite_inputs(name, where, bad):
    inputs = make_inputs((5000,), 3, seed=1)
    tensors = [t.clone() for t in inputs.tensors]
    tensors[where][4321] = bad
    broken = Inputs(tuple(tensors), inputs.base_index, inputs.name, inputs.seed)
    if name == "linear":
        params = registry.bind(registry.get("linear"), dict(weight=[0.4, 0.3, 0.2, 0.1]), 4, None, "test")
    else:
        params = bound(name, FAMILY_PARAMS[name][0], 3)
    assert fused_merge.merge(name, inputs, params, checks=True)[1:] == (True, True)
    _, inputs_finite, _ = fused_merge.merge(name, broken, params, checks=True)
    assert not inputs_finite


@pytest.mark.parametrize("out_dtype, big, finite", [
    (torch.float16, 65519.0, True),  # rounds to 65504
    (torch.float16, 65520.0, False),  # max + half an ulp: rounds to Inf
    (torch.bfloat16, 3.3895e38, True),  # about bf16's max
    (torch.bfloat16, 3.3962e38, False),  # past max + half an ulp (3.39617e38)
    (torch.float32, 2.0e38, True),
    (torch.float32, 3.0e38, False),  # plus a delta of 1e38: overflows fp32
])
def test_kernels_report_outputs_that_overflow_the_output_dtype(out_dtype, big, finite):
    base = torch.zeros(100)
    base[17] = big
    delta = torch.zeros(100)
    delta[3] = 1.0
    if out_dtype == torch.float32:
        delta[17] = 1.0e38
    inputs = Inputs((base, base + delta), base_index=0, name="w")
    params = bound("task_arithmetic", dict(weight=1.0), 1)
    out, _, output_finite = fused_merge.merge("task_arithmetic", inputs, params, out_dtype=out_dtype, checks=True)
    assert output_finite == bool(torch.isfinite(out).all()) == finite


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.01, 0.0])
@pytest.mark.parametrize("shape", [(7,), (33, 31), (2**19 + 5,)])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_seme_fusion_reports_the_references_statistics(select_topk, shape, kind):
    """SeMe's Select / Compute / Erase on the SCE kernel: the reference's tensor (fp32 sums apart)
    and the same statistics: selected fraction, sign-conflict rate and η, as rounded in the report."""
    from seme.methods.seme import seme_fuse

    inputs = make_inputs(shape, 3, kind, seed=4)
    params = registry.bind(registry.get("seme"), {"select_topk": select_topk}, 4, 0, "test")
    ref, ref_stats = seme_fuse(inputs, params)
    out, stats, inputs_finite = fused_merge.seme_fuse(inputs, params)
    assert inputs_finite and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(ref.abs().max())))
    assert stats == ref_stats


RAM_PARAMS = [("ram", dict(epsilon=1e-5)), ("ram", dict(epsilon=0.05)), ("ramplus_tl", dict(r=0.1, alpha=0.2)),
              ("ramplus_tl", dict(r=0.7, alpha=1.3, epsilon=0.05)), ("ramplus_tl", dict(r=0.3, alpha=0.05, epsilon=0.0))]


def sparse_inputs(shape, k, dtype, seed):
    """Base and k fine-tunes that each change about 40% of the elements (some equal to the base
    exactly), so that elements changed by no model, by one and by several all occur."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    others = [base + 0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.4) for _ in range(k)]
    return Inputs(tuple(t.to(dtype) for t in (base, *others)), base_index=0, name="w", seed=seed)


RAM_CASES = [(shape, k, dtype) for shape in [(1,), (7,), (1023,), (33, 31)] for k in (1, 2, 3, 8)
             for dtype in (torch.float32, torch.bfloat16, torch.float16)] + [(((1 << 20) + 3,), 3, torch.bfloat16)]


@pytest.mark.parametrize("shape,k,dtype", RAM_CASES)
@pytest.mark.parametrize("name,params", RAM_PARAMS)
def test_ram_is_bit_equal_to_its_reference(name, params, shape, k, dtype):
    """The reference sums the models in order, as the kernel does, so every dtype matches bit for bit,
    in fp32 and cast to the inputs' dtype."""
    inputs = sparse_inputs(shape, k, dtype, seed=k)
    p = registry.bind(registry.get(name), params, k + 1, 0, "test")
    ref = registry.get(name).fn(inputs, p)
    assert torch.equal(fused_merge.merge(name, inputs, p), ref)
    out, inputs_finite, output_finite = fused_merge.merge(name, inputs, p, out_dtype=dtype, checks=True)
    assert torch.equal(out, ref.to(dtype)) and inputs_finite and output_finite


@pytest.mark.parametrize("name,params", RAM_PARAMS[1:4])
def test_ram_threads_and_builds_agree(name, params):
    inputs = sparse_inputs((3, 70001), 3, torch.bfloat16, seed=5)
    p = registry.bind(registry.get(name), params, 4, 0, "test")
    one = fused_merge.merge(name, inputs, p, num_threads=1)
    assert torch.equal(one, fused_merge.merge(name, inputs, p, num_threads=2))
    for isa in ISAS:
        with cpu_isa(isa):
            assert torch.equal(one, fused_merge.merge(name, inputs, p, num_threads=2)), isa


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ram_nonfinite_inputs_propagate_as_in_the_reference(name, bad):
    inputs = sparse_inputs((5000,), 3, torch.float32, seed=2)
    tensors = [t.clone() for t in inputs.tensors]
    tensors[2][4321] = bad
    broken = Inputs(tuple(tensors), 0, "w")
    p = registry.bind(registry.get(name), {}, 4, 0, "test")
    out, inputs_finite, output_finite = fused_merge.merge(name, broken, p, checks=True)
    assert not inputs_finite and not output_finite
    torch.testing.assert_close(out, registry.get(name).fn(broken, p), equal_nan=True, rtol=0, atol=0)


SLERP_CASES = {"apart": lambda a: a + 0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9)),
               "collinear": lambda a: 2 * a, "opposite": lambda a: -a, "zero": torch.zeros_like}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 31), ((1 << 20) + 3,)])
@pytest.mark.parametrize("case", list(SLERP_CASES))
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.5])
def test_slerp_is_as_close_to_float64_as_the_reference(t, case, shape, dtype):
    """The kernel sums the norms and the cosine in double where the reference sums them in fp32:
    |kernel - ref64| <= |reference - ref64| + 1e-7 (relative to the result's scale)."""
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    tensors = (a.to(dtype), SLERP_CASES[case](a).to(dtype))
    method = registry.get("slerp")
    p = registry.bind(method, {"t": t}, 2, 0, "test")
    ref = method.fn(Inputs(tensors, 0, "w"), p).double()
    ref64 = method.fn(Inputs(tuple(x.double() for x in tensors), 0, "w"), p)
    out = fused_merge.merge("slerp", Inputs(tensors, 0, "w"), p).double()
    scale = max(float(ref64.abs().max()), 1e-30)
    assert float((out - ref64).abs().max()) <= float((ref - ref64).abs().max()) + 1e-7 * scale
    cast, inputs_finite, output_finite = fused_merge.merge("slerp", Inputs(tensors, 0, "w"), p, out_dtype=dtype,
                                                           checks=True)
    assert inputs_finite and output_finite
    assert torch.equal(cast, out.to(dtype))  # the fp32 result, rounded once


def test_slerp_threads_builds_and_nonfinite_inputs():
    a = torch.randn(3, 70001, generator=torch.Generator().manual_seed(3), dtype=torch.float32).to(torch.bfloat16)
    inputs = Inputs((a, (a.float() + 0.3).to(torch.bfloat16)), 0, "w")
    p = registry.bind(registry.get("slerp"), {"t": 0.4}, 2, 0, "test")
    one = fused_merge.merge("slerp", inputs, p, num_threads=1)
    assert torch.equal(one, fused_merge.merge("slerp", inputs, p, num_threads=2))
    for isa in ISAS:
        with cpu_isa(isa):
            assert torch.equal(one, fused_merge.merge("slerp", inputs, p, num_threads=2)), isa
    broken = Inputs((a, a.clone().index_fill_(1, torch.tensor([5]), float("nan"))), 0, "w")
    out, inputs_finite, output_finite = fused_merge.merge("slerp", broken, p, checks=True)
    assert not inputs_finite and not output_finite
    assert torch.isnan(registry.get("slerp").fn(broken, p)).all() and torch.isnan(out).all()  # as the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 31), ((1 << 20) + 3,)])
@pytest.mark.parametrize("case,k", [("apart", 2), ("apart", 3), ("apart", 5), ("same", 2), ("same", 5),
                                    ("opposite", 3), ("opposite", 5)])
def test_model_stock_is_as_close_to_float64_as_the_reference(case, k, shape, dtype):
    """Task vectors apart, all the same (cos 1) or alternating (a negative mean cosine):
    |kernel - ref64| <= |reference - ref64| + 1e-6 (relative). Two opposite ones sit on t's
    singularity, where a rounding of the inputs moves t without bound: no two sums agree there."""
    g = torch.Generator().manual_seed(k)
    base = torch.randn(shape, generator=g)
    deltas = [0.01 * torch.randn(shape, generator=g) for _ in range(k)]
    if case != "apart":
        deltas = [deltas[0] * (-1 if case == "opposite" and i % 2 else 1) for i in range(k)]
    tensors = tuple(x.to(dtype) for x in [base] + [base + d for d in deltas])
    method = registry.get("model_stock")
    p = registry.bind(method, {}, k + 1, 0, "test")
    ref = method.fn(Inputs(tensors, 0, "w"), p).double()
    ref64 = method.fn(Inputs(tuple(x.double() for x in tensors), 0, "w"), p)
    out, inputs_finite, output_finite = fused_merge.merge("model_stock", Inputs(tensors, 0, "w"), p, checks=True)
    assert inputs_finite and output_finite
    scale = max(float(ref64.abs().max()), 1e-30)
    assert float((out.double() - ref64).abs().max()) <= float((ref - ref64).abs().max()) + 1e-6 * scale


def test_model_stock_filter_wise_takes_the_reference(llama_family, tmp_path):
    import seme
    from conftest import load_folder

    recipe = {"merge_method": "model_stock", "base_model": llama_family["base"], "dtype": "float32",
              "parameters": {"filter_wise": True}, "models": [{"model": llama_family[f"expert{i}"]} for i in range(3)]}
    p = registry.bind(registry.get("model_stock"), {"filter_wise": True}, 4, 0, "test")
    assert not fused_merge.covers("model_stock", p, (8,))
    with pytest.raises(ValueError, match="no fused kernel for method 'model_stock'"):
        fused_merge.merge("model_stock", make_inputs((8,), 3), p)
    seme.merge(recipe, str(tmp_path / "auto"), progress=False)  # the native engine hands every tensor to torch
    seme.merge(recipe, str(tmp_path / "reference"), progress=False, backend="reference")
    auto, reference = load_folder(tmp_path / "auto"), load_folder(tmp_path / "reference")
    assert all(torch.equal(auto[n], reference[n]) for n in reference)


def test_model_stock_threads_and_builds_agree():
    inputs = sparse_inputs((3, 70001), 3, torch.bfloat16, seed=4)
    p = registry.bind(registry.get("model_stock"), {}, 4, 0, "test")
    one = fused_merge.merge("model_stock", inputs, p, num_threads=1)
    assert torch.equal(one, fused_merge.merge("model_stock", inputs, p, num_threads=2))
    for isa in ISAS:
        with cpu_isa(isa):
            assert torch.equal(one, fused_merge.merge("model_stock", inputs, p, num_threads=2)), isa
