"""The engines: the torch-free native one gives the torch engine's bytes, never loads torch, and
hands what its kernels cannot take to the torch engine."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import seme
from conftest import build_family, with_bad_element
from seme import engine, fused_merge

pytestmark = pytest.mark.skipif(not fused_merge.available(), reason="native extension not built")

RECIPES = {
    "linear": {"merge_method": "linear", "parameters": {"weight": 1.0}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.7}},
    "ties": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.4}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.5}, "random_seed": 3},
    "dare_linear": {"merge_method": "dare_linear", "parameters": {"weight": 0.5, "density": 0.5}},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "parameters": {"weight": 1.0, "density": 0.6,
                                                                            "gamma": 0.1}},
    "della": {"merge_method": "della", "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
    "sce": {"merge_method": "sce", "parameters": {"select_topk": 0.5}},
    "lrp": {"merge_method": "lrp", "parameters": {"density": 0.4}},
    "ram": {"merge_method": "ram", "parameters": {"epsilon": 0.001}},
    "ramplus_tl": {"merge_method": "ramplus_tl", "parameters": {"epsilon": 0.001, "r": 0.5}},
    "slerp": {"merge_method": "slerp", "parameters": {"t": [0.2, 0.8]}},
    "model_stock": {"merge_method": "model_stock", "parameters": {}},
}


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("bf16")), "llama", n_experts=2, dtype=torch.bfloat16)


def _recipe(name: str, family: dict, **extra) -> dict:
    spec = dict(RECIPES[name])
    recipe = {"merge_method": spec.pop("merge_method"), "parameters": spec.pop("parameters"), **spec, **extra}
    experts = [{"model": family["expert0"]}, {"model": family["expert1"]}][:1 if name == "slerp" else 2]
    if recipe["merge_method"] == "linear":
        recipe["models"] = [{"model": family["base"]}] + experts
    else:
        recipe["base_model"] = family["base"]
        recipe["models"] = experts
    return recipe


def _shards(folder) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.startswith("model")}


def _merge_with(monkeypatch, cls, recipe: dict, out, **options) -> tuple[dict[str, bytes], object]:
    made = []

    def make(plan, device, backend, world, allow_nonfinite):
        made.append(cls(plan, device, allow_nonfinite) if cls is engine.NativeEngine
                    else cls(plan, device, backend, allow_nonfinite=allow_nonfinite))
        return made[-1]

    monkeypatch.setattr("seme.executor.make_engine", make)
    seme.merge(recipe, str(out), out_shard_size="40KB", **options)
    return _shards(out), made[0]


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("extra", [{}, {"out_dtype": "float32"}, {"dtype": "float32", "out_dtype": "float16"}],
                         ids=["bf16", "to-fp32", "fp32-to-fp16"])
def test_native_engine_writes_the_torch_engines_bytes(bf16_family, tmp_path, monkeypatch, method, extra):
    recipe = _recipe(method, bf16_family, **extra)
    native, used = _merge_with(monkeypatch, engine.NativeEngine, recipe, tmp_path / "native")
    reference, _ = _merge_with(monkeypatch, engine.TorchEngine, recipe, tmp_path / "torch")
    assert used._torch is None  # every tensor went to the kernels
    assert native.keys() == reference.keys() and len(native) > 2
    for f in native:
        assert native[f] == reference[f], f


@pytest.mark.parametrize("normalize", [True, False])
def test_native_engine_merges_slices_of_one_model(bf16_family, tmp_path, monkeypatch, normalize):
    # a frankenmerge written with linear: each slice one model's layers, its weighted copy (no torch needed)
    recipe = {"merge_method": "linear", "parameters": {"weight": 0.5, "normalize": normalize},
              "slices": [{"sources": [{"model": bf16_family["base"], "layer_range": [0, 2]}]},
                         {"sources": [{"model": bf16_family["expert0"], "layer_range": [1, 2]}]}]}
    native, used = _merge_with(monkeypatch, engine.NativeEngine, recipe, tmp_path / "native")
    reference, _ = _merge_with(monkeypatch, engine.TorchEngine, recipe, tmp_path / "torch")
    assert used._torch is None and native == reference


def test_native_engine_hands_what_its_kernels_cannot_take_to_torch(bf16_family, llama_family, tmp_path, monkeypatch):
    # fp32 inputs merged in bfloat16 are rounded first: only the torch engine does that.
    recipe = _recipe("ties", llama_family, dtype="bfloat16")
    native, used = _merge_with(monkeypatch, engine.NativeEngine, recipe, tmp_path / "native")
    reference, _ = _merge_with(monkeypatch, engine.TorchEngine, recipe, tmp_path / "torch")
    assert used._torch is not None and native == reference


BROKEN = "model.layers.1.mlp.up_proj.weight"
# the native engine, the torch engine on the fused kernels, and the plain-torch reference
ENGINES = {"native": (engine.NativeEngine, {}), "fused": (engine.TorchEngine, {}),
           "reference": (engine.TorchEngine, {"backend": "reference"})}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "sce", "task_arithmetic",
                                    "slerp"])
@pytest.mark.parametrize("where", ["base", "expert0"])
@pytest.mark.parametrize("value", [float("nan"), -float("inf")])  # -Inf: a +Inf δ in the base, -Inf in a model
def test_a_nonfinite_input_is_an_error_or_merged_as_the_reference_on_every_engine(bf16_family, tmp_path, monkeypatch,
                                                                                  capsys, method, where, value):
    # The kernels leave a masked-out NaN or Inf out of the output; the reference lets it through
    # (NaN * 0, a NaN sign sum, a NaN L1 norm), as mergekit does: without the rule a one-element
    # defect wrote a finite tensor on one engine and stopped the merge on another.
    from seme.errors import SemeError

    family = dict(bf16_family, **{where: with_bad_element(bf16_family[where], tmp_path / f"bad-{where}", BROKEN, value)})
    recipe = _recipe(method, family)
    written = {}
    for name, (cls, options) in ENGINES.items():
        with pytest.raises(SemeError, match=f"^input tensor '{BROKEN}' of bad-{where} contains NaN or Inf "
                                            r"\(pass --allow-nonfinite to merge it anyway\)$"):
            _merge_with(monkeypatch, cls, recipe, tmp_path / name, **options)
        capsys.readouterr()
        written[name], _ = _merge_with(monkeypatch, cls, recipe, tmp_path / f"{name}-allowed", allow_nonfinite=True,
                                       **options)
        assert f"seme: warning: input tensor '{BROKEN}' of bad-{where} contains NaN or Inf\n" in capsys.readouterr().err
    assert written["native"] == written["fused"] == written["reference"]


@pytest.mark.parametrize("method", ["ties", "slerp", "model_stock", "ramplus_tl"])
def test_cpu_merge_of_a_fused_method_never_imports_torch(bf16_family, tmp_path, method):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_recipe(method, bf16_family)))
    code = ("import sys; from seme.merge import main; status = main([sys.argv[1], sys.argv[2]]); "
            "print(status, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split() == ["0", "False"], proc.stderr


def test_make_engine_picks_native_only_where_it_serves_the_whole_run(bf16_family):
    from seme.config import load
    from seme.plan import make_plan

    plan = make_plan(load(_recipe("ties", bf16_family)))
    assert isinstance(engine.make_engine(plan, "cpu", "auto", 1), engine.NativeEngine)
    assert isinstance(engine.make_engine(plan, "cpu", "reference", 1), engine.TorchEngine)
    assert isinstance(engine.make_engine(plan, "cpu", "auto", 2), engine.TorchEngine)
    nearswap = {"merge_method": "nearswap", "base_model": bf16_family["base"], "parameters": {"t": 0.3},
                "models": [{"model": bf16_family["base"]}, {"model": bf16_family["expert0"]}]}
    assert isinstance(engine.make_engine(make_plan(load(nearswap)), "cpu", "auto", 1), engine.TorchEngine)


def test_max_memory_counts_the_reference_temporaries_of_tensors_beyond_the_kernels_index_range(bf16_family,
                                                                                               monkeypatch):
    from seme import executor
    from seme.config import load
    from seme.plan import make_plan

    plan = make_plan(load(_recipe("ties", bf16_family)))
    merged = [t for t in plan.tasks if not t.copy]
    assert all(executor._working_bytes(plan, t, "cpu", "auto") == 0 for t in merged)  # the kernels' scratch is small
    monkeypatch.setattr(fused_merge, "MAX_ELEMENTS", 500)
    large = [t for t in merged if math.prod(t.shape) >= 500]
    assert large and len(large) < len(merged)
    assert all(engine.reference_bytes(plan, t, fused=False) > 0 for t in large)
    for t in merged:
        need = executor._working_bytes(plan, t, "cpu", "auto")
        assert need == (engine.reference_bytes(plan, t, fused=False) if t in large else 0), t.name


def test_max_memory_with_allow_nonfinite_counts_the_reference_temporaries(bf16_family, tmp_path, capsys):
    # a tensor with a NaN or Inf input is then merged by the reference, whatever the backend
    from seme import executor
    from seme.config import load
    from seme.errors import SemeError
    from seme.plan import make_plan

    recipe = _recipe("ties", bf16_family)
    shown = {}
    for allow in (False, True):
        seme.merge(recipe, str(tmp_path / "out"), dry_run=True, allow_nonfinite=allow)
        shown[allow] = int(next(line for line in capsys.readouterr().out.splitlines()
                                if line.startswith("memory: ")).split()[1])
    assert shown[True] == executor.largest_need(make_plan(load(recipe)), "cpu", "reference")[0] > shown[False]
    with pytest.raises(SemeError, match="below what the largest tensor needs"):
        seme.merge(recipe, str(tmp_path / "short"), max_memory=shown[True] - 1, allow_nonfinite=True)
    seme.merge(recipe, str(tmp_path / "enough"), max_memory=shown[True], allow_nonfinite=True)


def test_tensors_beyond_the_kernels_index_range_take_the_reference(bf16_family, tmp_path, monkeypatch):
    # The kernels index elements in 32 bits; the limit is lowered here so that tiny tensors cross it.
    from conftest import load_folder

    recipe = _recipe("ties", bf16_family, out_dtype="float32")
    seme.merge(recipe, str(tmp_path / "reference"), backend="reference")
    monkeypatch.setattr(fused_merge, "MAX_ELEMENTS", 500)
    _, used = _merge_with(monkeypatch, engine.NativeEngine, recipe, tmp_path / "capped")
    assert used._torch is not None
    merged, reference = load_folder(tmp_path / "capped"), load_folder(tmp_path / "reference")
    assert merged.keys() == reference.keys()
    for name, t in reference.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-6, msg=name)
