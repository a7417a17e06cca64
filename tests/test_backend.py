"""The engine uses the fused kernels by default, and they give the reference's result end to end."""
from __future__ import annotations

import pytest
import torch

import seme
from conftest import load_folder
from seme import fused_merge
from seme.backend import implementation
from seme.errors import SemeError


@pytest.mark.skipif(not fused_merge.available(), reason="seme._C is not built")
def test_auto_picks_the_cpp_kernel_where_it_covers_the_method():
    assert implementation("ties", "auto", torch.device("cpu"))[1]
    assert implementation("ram", "auto", torch.device("cpu"))[1]
    assert implementation("slerp", "auto", torch.device("cpu"))[1]
    assert not implementation("karcher", "auto", torch.device("cpu"))[1]
    assert not implementation("ties", "reference", torch.device("cpu"))[1]
    with pytest.raises(SemeError, match="no fused kernel for method 'karcher'"):
        implementation("karcher", "fused", torch.device("cpu"))


@pytest.mark.parametrize("method, params", [
    ("ties", {"weight": 1.0, "density": 0.3}), ("dare_ties", {"weight": 1.0, "density": 0.5}),
    ("sce", {"select_topk": 0.2}), ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    ("ramplus_tl", {"epsilon": 0.001, "r": 0.5}),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_fused_and_reference_backends_agree_on_whole_merges(llama_family, tmp_path, method, params, dtype):
    recipe = {"merge_method": method, "base_model": llama_family["base"], "dtype": dtype, "random_seed": 1,
              "parameters": params, "models": [{"model": llama_family[f"expert{i}"]} for i in range(3)]}
    seme.merge(recipe, str(tmp_path / "fused"), backend="auto", progress=False)
    seme.merge(recipe, str(tmp_path / "reference"), backend="reference", progress=False)
    fused, reference = load_folder(tmp_path / "fused"), load_folder(tmp_path / "reference")
    for name, t in reference.items():
        assert fused[name].dtype == t.dtype
        tol = {"float32": 1e-6, "float64": 1e-12, "bfloat16": 1e-2}[dtype]
        torch.testing.assert_close(fused[name].float(), t.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("method, params", [
    ("ties", {"weight": 1.0, "density": 0.3}), ("dare_linear", {"weight": 0.5, "density": 0.5}),
    ("sce", {"select_topk": 0.2}), ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    ("ramplus_tl", {"epsilon": 0.001, "r": 0.5}),  # the Triton kernel on the GPU, the C++ kernel on the CPU
    ("slerp", {"t": 0.3}), ("model_stock", {}), ("linear", {"weight": 0.4}),
])
def test_gpu_merges_equal_cpu_merges(llama_family, tmp_path, method, params):
    # The CUDA C++ kernel (default on a GPU) and the C++ CPU kernel draw the same masks; RAM+, SLERP, Model
    # Stock and linear run the C++ kernels' passes on the GPU's Triton kernels.
    experts = [{"model": llama_family[f"expert{i}"]} for i in range(1 if method == "slerp" else 3)]
    recipe = {"merge_method": method, "base_model": llama_family["base"], "dtype": "float32", "random_seed": 1,
              "parameters": params, "models": experts}
    seme.merge(recipe, str(tmp_path / "gpu"), device="cuda", progress=False)
    seme.merge(recipe, str(tmp_path / "cpu"), device="cpu", progress=False)
    gpu, cpu = load_folder(tmp_path / "gpu"), load_folder(tmp_path / "cpu")
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name], t, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.skipif(not fused_merge.available(), reason="seme._C is not built")
def test_seme_fuses_on_the_cpp_kernel_with_the_references_report(llama_family, tmp_path):
    import json

    assert implementation("seme", "auto", torch.device("cpu"))[1]
    recipe = {"merge_method": "seme", "base_model": llama_family["base"], "parameters": {"select_topk": 0.5},
              "models": [{"model": llama_family[f"expert{i}"]} for i in range(3)]}
    seme.merge(recipe, str(tmp_path / "fused"), backend="auto", progress=False)
    seme.merge(recipe, str(tmp_path / "reference"), backend="reference", progress=False)
    fused, reference = load_folder(tmp_path / "fused"), load_folder(tmp_path / "reference")
    for name, t in reference.items():
        torch.testing.assert_close(fused[name], t, rtol=1e-6, atol=1e-6, msg=name)
    reports = [json.loads((tmp_path / side / "seme_report.json").read_text())["tensors"] for side in ("fused", "reference")]
    assert reports[0].keys() == reports[1].keys()
    for name, stats in reports[1].items():
        for key in ("selected_fraction", "sign_conflict_rate", "eta"):
            assert reports[0][name][key] == pytest.approx(stats[key], abs=2e-6), (name, key)
