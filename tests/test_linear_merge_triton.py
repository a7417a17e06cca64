"""The Triton kernels of linear, SLERP, Model Stock, RAM and RAM+ against the plain-torch references and
the C++ CPU kernels: on a GPU when there is one, else on CPU through the interpreter.

Small sizes only: the interpreter runs every program in numpy. BLOCK is lowered so that even these sizes
span several blocks (the Gram and count partial sums across blocks).
"""
from __future__ import annotations

import pytest
import torch

from triton_device import DEVICE  # first: it sets up the interpreter where there is no GPU

from seme import fused_merge as cpu_kernel  # noqa: E402
from seme.kernels import linear_merge as lm  # noqa: E402
from seme.methods import registry  # noqa: E402
from seme.methods.inputs import Inputs  # noqa: E402

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason="seme._C is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (300,), (2049,), (17, 33)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(lm, "BLOCK", 64)


def make_inputs(shape, k, dtype=torch.float32, seed=0, sparse=False):
    """A base (first) and k fine-tunes; `sparse`: each changes about 40% of the elements, so that RAM
    sees elements changed by no model, by one and by several."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    others = [base + 0.1 * (i + 1) * torch.randn(shape, generator=g) * ((torch.rand(shape, generator=g) < 0.4)
                                                                       if sparse else 1) for i in range(k)]
    return Inputs(tuple(t.to(dtype) for t in (base, *others)), base_index=0, name="model.layers.0.w", seed=seed)


def bind(method, supplied, inputs):
    m = registry.get(method)
    return registry.bind(m, supplied, len(inputs.tensors), None if method == "linear" else 0, "test")


def on_device(inputs: Inputs) -> Inputs:
    return Inputs(tuple(t.to(DEVICE) for t in inputs.tensors), inputs.base_index, inputs.name, inputs.seed)


def run(method, inputs, params, out_dtype=torch.float32):
    out = lm.fused_merge(method, on_device(inputs), params, out_dtype).cpu()
    assert out.dtype == out_dtype and out.shape == inputs.tensors[0].shape
    return out


def closer_to_float64_than(out, method, inputs, params, slack):
    """|kernel − ref64| <= |reference − ref64| + slack · scale: the kernel's Gram sums in float64 where the
    reference sums its norms and cosines in fp32."""
    ref = registry.get(method).fn(inputs, params).double()
    ref64 = registry.get(method).fn(Inputs(tuple(t.double() for t in inputs.tensors), 0, inputs.name), params)
    scale = max(float(ref64.abs().max()), 1e-30)
    assert float((out.double() - ref64).abs().max()) <= float((ref - ref64).abs().max()) + slack * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference_and_cpp_kernel(shape, k, normalize):
    dtype = DTYPES[k % 3]
    inputs = make_inputs(shape, k - 1, dtype, seed=k)  # k models in all: linear has no base
    params = bind("linear", {"weight": [0.7, -0.4, 1.1, 0.25, 0.5][:k], "normalize": normalize}, inputs)
    got = run("linear", inputs, params)
    torch.testing.assert_close(got, registry.get("linear").fn(inputs, params), rtol=2e-6, atol=1e-6)
    if cpu_kernel.available():
        torch.testing.assert_close(got, cpu_kernel.merge("linear", inputs, params), rtol=2e-6, atol=1e-6)


SLERP_CASES = {"apart": lambda a: a + 0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9)),
               "collinear": lambda a: 2 * a, "opposite": lambda a: -a, "zero": torch.zeros_like}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(SLERP_CASES))
@pytest.mark.parametrize("t", [0.0, 0.3, 1.5])
def test_slerp_is_as_close_to_float64_as_the_reference(t, case, shape, dtype):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    inputs = Inputs((a.to(dtype), SLERP_CASES[case](a).to(dtype)), 0, "w")
    params = bind("slerp", {"t": t}, inputs)
    got = run("slerp", inputs, params)
    closer_to_float64_than(got, "slerp", inputs, params, 1e-7)
    if cpu_kernel.available():
        torch.testing.assert_close(got, cpu_kernel.merge("slerp", inputs, params), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case,k", [("apart", 2), ("apart", 3), ("apart", 5), ("same", 2), ("same", 4),
                                    ("opposite", 3), ("opposite", 5)])
def test_model_stock_is_as_close_to_float64_as_the_reference(case, k, shape, dtype):
    """Task vectors apart, all the same (cos 1) or alternating (a negative mean cosine). Two opposite ones
    would sit on t's singularity, where any rounding moves t without bound."""
    g = torch.Generator().manual_seed(k)
    base = torch.randn(shape, generator=g)
    deltas = [0.01 * torch.randn(shape, generator=g) for _ in range(k)]
    if case != "apart":
        deltas = [deltas[0] * (-1 if case == "opposite" and i % 2 else 1) for i in range(k)]
    inputs = Inputs(tuple(x.to(dtype) for x in [base] + [base + d for d in deltas]), 0, "w")
    params = bind("model_stock", {}, inputs)
    got = run("model_stock", inputs, params)
    closer_to_float64_than(got, "model_stock", inputs, params, 1e-6)
    if cpu_kernel.available() and case == "apart":
        torch.testing.assert_close(got, cpu_kernel.merge("model_stock", inputs, params), rtol=2e-6, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("deltas,k", [(False, 1), (True, 2), (True, 5)])
@pytest.mark.parametrize("shape", [(7,), (2049,), (17, 33)])
def test_gram_equals_the_cpp_kernels(deltas, k, shape):
    """The Gram pass's float64 sums: the C++ kernel's up to the order of the sums, so that both give the
    same SLERP and Model Stock coefficients up to fp rounding."""
    from seme import _C

    inputs = make_inputs(shape, k, torch.bfloat16, seed=k)
    b, xs = inputs.base, inputs.others
    got = lm._gram(tuple(x.to(DEVICE) for x in xs), b.to(DEVICE), deltas)
    flat = _C.gram(base=b.data_ptr(), others=[x.data_ptr() for x in xs], n=b.numel(),
                   in_dtype=cpu_kernel.kernel_dtype(b.dtype), deltas=deltas, num_threads=1)
    got = torch.tensor(got, dtype=torch.float64)
    torch.testing.assert_close(got.flatten(), torch.tensor(flat, dtype=torch.float64), rtol=1e-12, atol=1e-12)


RAM_PARAMS = [("ram", dict(epsilon=1e-5)), ("ram", dict(epsilon=0.05)), ("ramplus_tl", dict(r=0.1, alpha=0.2)),
              ("ramplus_tl", dict(r=0.7, alpha=1.3, epsilon=0.05)),
              ("ramplus_tl", dict(r=0.3, alpha=0.05, epsilon=0.0))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("name,supplied", RAM_PARAMS)
def test_ram_is_bit_equal_to_its_reference(name, supplied, shape, k):
    """The reference sums the models in order, as the kernel does: bit for bit, in fp32 and cast."""
    dtype = DTYPES[(k + len(shape)) % 3]
    inputs = make_inputs(shape, k, dtype, seed=k, sparse=True)
    params = bind(name, supplied, inputs)
    ref = registry.get(name).fn(inputs, params)
    assert torch.equal(run(name, inputs, params), ref)
    assert torch.equal(run(name, inputs, params, dtype), ref.to(dtype))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ram_nonfinite_inputs_propagate_as_in_the_reference(name, bad):
    inputs = make_inputs((300,), 3, seed=2, sparse=True)
    tensors = [t.clone() for t in inputs.tensors]
    tensors[2][123] = bad
    broken = Inputs(tuple(tensors), 0, "w")
    params = bind(name, {}, broken)
    torch.testing.assert_close(run(name, broken, params), registry.get(name).fn(broken, params), equal_nan=True,
                               rtol=0, atol=0)


METHODS = [("linear", {"weight": [0.5, 1.0, 0.8, 0.25]}), ("slerp", {"t": 0.3}), ("model_stock", {}),
           ("ram", {"epsilon": 0.05}), ("ramplus_tl", {"epsilon": 0.05, "r": 0.5})]


def some_inputs(method, dtypes):
    inputs = make_inputs((300,), 3, seed=5, sparse=method.startswith("ram"))
    tensors = tuple(t.to(d) for t, d in zip(inputs.tensors, dtypes))
    return Inputs(tensors[:2] if method == "slerp" else tensors, 0, inputs.name, inputs.seed)


@pytest.mark.parametrize("method,supplied", METHODS)
def test_mixed_input_dtypes(method, supplied):
    inputs = some_inputs(method, (torch.float16, torch.bfloat16, torch.float32, torch.float16))
    params = bind(method, supplied, inputs)
    got, ref = run(method, inputs, params), registry.get(method).fn(inputs, params)
    if method.startswith("ram"):
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("method,supplied", METHODS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes(method, supplied, out_dtype):
    # Rounded to nearest even from the kernel's fp32 result (which may sit one fp32 ulp from the
    # reference's): the reference's cast within one ulp of the output dtype (RAM: exactly).
    inputs = some_inputs(method, [torch.bfloat16] * 4)
    params = bind(method, supplied, inputs)
    got, ref = run(method, inputs, params, out_dtype), registry.get(method).fn(inputs, params).to(out_dtype)
    if method.startswith("ram"):
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got.float(), ref.float())


def test_default_block_size(monkeypatch):
    monkeypatch.setattr(lm, "BLOCK", 1024)
    for method, supplied in METHODS:
        inputs = some_inputs(method, [torch.float32] * 4)
        params = bind(method, supplied, inputs)
        torch.testing.assert_close(run(method, inputs, params), registry.get(method).fn(inputs, params),
                                   rtol=2e-6, atol=1e-6)


def test_degenerate_inputs():
    base = torch.randn(5, device=DEVICE)
    only_base = Inputs((base,), base_index=0)
    params = registry.bind(registry.get("ram"), {}, 1, 0, "test")
    assert torch.equal(lm.fused_merge("ram", only_base, params), base)  # nothing to merge: the base
    empty = Inputs((torch.empty(0, 3, device=DEVICE),) * 3, base_index=0)
    params = bind("model_stock", {}, empty)
    assert lm.fused_merge("model_stock", empty, params).shape == (0, 3)
    assert not lm.covers("model_stock", {"filter_wise": True}) and not lm.covers("ties", {})
    with pytest.raises(ValueError):
        lm.fused_merge("model_stock", make_inputs((8,), 2), {"filter_wise": True})
    inputs = make_inputs((7,), 2)
    wide = Inputs((inputs.base.double(), *inputs.others), 0, "w")  # float64: the reference, in float64
    params = bind("ram", {}, wide)
    assert torch.equal(lm.fused_merge("ram", wide, params, torch.float64), registry.get("ram").fn(wide, params))


def test_gpu_backend_runs_them_on_the_kernels():
    """The backend's CUDA choice for these methods: the Triton kernels (run here wherever the tests run),
    the reference (None) for filter-wise Model Stock."""
    from seme import backend

    for method, supplied in METHODS:
        inputs = some_inputs(method, [torch.float32] * 4)
        params = bind(method, supplied, inputs)
        merged = backend._fused(method, torch.device("cuda"))(on_device(inputs), params, torch.bfloat16)
        assert torch.equal(merged.tensor, lm.fused_merge(method, on_device(inputs), params, torch.bfloat16))
    inputs = make_inputs((300,), 3, seed=3)
    params = bind("model_stock", {"filter_wise": True}, inputs)
    assert backend._fused("model_stock", torch.device("cuda"))(on_device(inputs), params, torch.float32) is None
