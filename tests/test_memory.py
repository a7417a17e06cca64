"""What a plain-torch (reference) merge holds at its peak is what its method declares
(`Method.peak_buffers`), so that --max-memory counts it before the merge starts.

One subprocess measures every method: resident memory's high-water mark (VmHWM, reset through
/proc/self/clear_refs) over a merge of 2^18-element tensors, with glibc returning every freed
buffer to the system (MALLOC_MMAP_THRESHOLD_), in units of fp32 tensors of that size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

N = 1 << 18
PARAMS = {"linear": {"weight": 1.0}, "slerp": {"t": 0.3}, "nearswap": {"t": 0.01}, "nuslerp": {"weight": 0.5},
          "multislerp": {"weight": 0.5}, "karcher": {}, "model_stock": {}, "arcee_fusion": {}, "passthrough": {},
          "sce": {"select_topk": 0.3}, "lrp": {"density": 0.3}, "seme": {"select_topk": 0.3}, "ram": {}, "ramplus_tl": {},
          **{m: {"weight": 1.0, "density": 0.3} for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear",
                                                           "breadcrumbs", "breadcrumbs_ties")},
          **{m: {"weight": 1.0, "density": 0.5, "epsilon": 0.1} for m in ("della", "della_linear")}}


def resident(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def measure() -> dict:
    """{method: {inputs: [(dtype, fp32 buffers at the peak)]}}, for the fewest, 2, 3 and 5 inputs (those a method
    takes), fp32 and bf16 inputs; a method whose base is optional, with and without one."""
    import torch

    from seme.methods import registry
    from seme.methods.inputs import Inputs

    found = {}
    for name in registry.names():
        method = registry.get(name)
        for has_base in {"ignored": [False], "required": [True], "optional": [True, False]}[method.base]:
            valid = [k for k in range(1, 6) if method.check_inputs(k, has_base) is None]
            for k in sorted({valid[0], valid[-1]} | ({2, 3} & set(valid))):
                base_index = 0 if has_base else None
                params = registry.bind(method, PARAMS[name], k, base_index, "test")
                for dtype in (torch.float32, torch.bfloat16):
                    g = torch.Generator().manual_seed(0)
                    base = torch.randn(N, generator=g)
                    tensors = [base.to(dtype)] + [(base + 0.01 * torch.randn(N, generator=g)).to(dtype)
                                                  for _ in range(k - 1)]
                    del base
                    inputs = Inputs(tuple(tensors), base_index, "model.layers.0.mlp.up_proj.weight")
                    small = Inputs(tuple(t[:4096].clone() for t in tensors), base_index, "w")
                    method.fn(small, params)  # lazy initialisations are not the merge's
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
                    before = resident("VmRSS:")
                    result = method.fn(inputs, params)
                    peak = resident("VmHWM:") - before
                    del result
                    found.setdefault(name, {}).setdefault(k, []).append((str(dtype), peak / (N * 4)))
    return found


@pytest.fixture(scope="module")
def peaks():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_reference_merge_stays_within_its_declared_peak(peaks):
    from seme.methods import registry

    for name, by_count in peaks.items():
        a, b = registry.get(name).peak_buffers
        for k, measured in by_count.items():
            for dtype, buffers in measured:  # 0.05: a few pages of bookkeeping, which vary from run to run
                assert buffers <= a + b * int(k) + 0.05, f"{name}, {k} {dtype} inputs: {buffers:.3f} > {a} + {b} x {k}"
        # and tightly enough to be of use: within 4.5 buffers of what the most inputs measured need
        k = max(by_count, key=int)
        loose = a + b * int(k) - max(buffers for _, buffers in by_count[k])
        assert loose <= 4.5, f"{name}: declared {a} + {b} k is loose by {loose:.1f} buffers at {k} inputs"


def measure_merges(root: str) -> dict:
    """{recipe: (resident peak of its merge, the least --max-memory it takes)}, over merges of bf16 models whose
    embeddings (2^22 elements) are the largest tensors, each merge run twice (the first makes what is made once:
    imports, kernels' thread pools) and measured the second time."""
    import torch

    import seme
    from conftest import build_model
    from seme.config import load
    from seme import executor
    from seme.executor import least_memory
    from seme.plan import make_plan

    paths = [os.path.join(root, f"m{i}") for i in range(3)]
    for i, path in enumerate(paths):
        build_model(path, "llama", seed=i, layers=1, hidden=64, vocab=1 << 16, dtype=torch.bfloat16)
    with open(os.path.join(paths[2], "tokenizer.json")) as f:  # another vocabulary: its last words differ
        tokenizer = json.load(f)
    words = tokenizer["model"]["vocab"]
    tokenizer["model"]["vocab"] = {(f"x{w}" if i >= len(words) - 2000 else w): i for w, i in words.items()}
    with open(os.path.join(paths[2], "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    ties = {"merge_method": "ties", "base_model": paths[0], "parameters": {"weight": 1.0, "density": 0.5},
            "models": [{"model": p} for p in paths]}
    # SeMe: rotated sources (one with another vocabulary: its rows re-ordered) and the drift report; then the
    # probability alignment (anchors and their top tokens) and stabilisation (the reference SCE of each trial)
    aligned = {"merge_method": "seme", "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
               "parameters": {"alignment": "always"}}
    # and wide, short heads (600 x 512) aligned by probability, whose pre-pass (each model's G⁻¹, the alignment's
    # d x d matrices, the anchors) outweighs any one tensor's merge
    wide = [os.path.join(root, f"w{i}") for i in range(2)]
    for i, path in enumerate(wide):
        build_model(path, "llama", seed=i, layers=1, hidden=512, vocab=600, dtype=torch.bfloat16)
    recipes = {"ties, cast to fp16 first": {**ties, "dtype": "float16"},
               "ties, vocabularies re-mapped": {**ties, "tokenizer": {"source": "union"}},
               "seme, aligned": aligned,
               "seme, aligned, merged in bf16": {**aligned, "dtype": "bfloat16"},
               "seme, aligned by probability, stabilized": {**aligned, "parameters": {
                   "alignment": "always", "align_mode": "probability", "stabilize": True}},
               "seme, wide heads (the pre-pass outweighs the loop)": {
                   **aligned, "base_model": wide[0], "models": [{"model": wide[1]}],
                   "parameters": {"alignment": "always", "align_mode": "probability"}}}
    # measured from the start of the merge loop: planning's own memory (a union's tokenizers, 65536 tokens each)
    # is no tensor's and not what --max-memory bounds
    started = []
    execute = executor._execute

    def measured(*args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        started.append(resident("VmRSS:"))
        return execute(*args, **kwargs)

    executor._execute = measured
    found = {}
    for name, recipe in recipes.items():
        need = max(least_memory(make_plan(load(recipe)), "cpu", "auto"))
        for run in range(2):
            seme.merge(recipe, os.path.join(root, f"out{run}"), progress=False, overwrite=True, max_memory=need)
            found[name] = (resident("VmHWM:") - started[-1], need)
    return found


@pytest.fixture(scope="module")
def merge_peaks(tmp_path_factory):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "OMP_NUM_THREADS": "1"}
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, __file__, "merges", str(tmp_path_factory.mktemp("merges"))],
                          capture_output=True, text=True, env=env, timeout=600, cwd=os.path.dirname(here))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_merge_outside_the_native_kernels_stays_within_what_max_memory_counts(merge_peaks):
    # the merges go through the torch engine: its copies in the compute dtype, the re-mapped inputs and the
    # kernel's result (before it is copied into the output's buffer) are held besides the inputs
    for name, (peak, need) in merge_peaks.items():  # 10%: the kernels' bit arrays, small temporaries, bookkeeping
        assert peak <= 1.1 * need, f"{name}: resident peak {peak / 2**20:.1f} MiB > {need / 2**20:.1f} MiB counted"
        # and tightly enough to be of use (SeMe's counts are bounds: every source as rotated, G⁻¹ in float64)
        assert peak >= 0.5 * need, f"{name}: resident peak {peak / 2**20:.1f} MiB, {need / 2**20:.1f} MiB counted"


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:1] = [here, os.path.dirname(here)]  # conftest, and the seme beside the tests (not an installed one)
    if sys.argv[1:2] == ["merges"]:
        print(json.dumps(measure_merges(sys.argv[2])))
    else:
        print(json.dumps(measure()))


def test_max_memory_counts_the_temporaries_of_a_plain_torch_merge(llama_family, tmp_path):
    import seme
    from seme.errors import SemeError
    from seme.methods import registry

    # the largest tensors: embedding and head, 96 x 32 fp32 (12288 bytes); NearSwap has no fused kernel
    recipe = {"merge_method": "nearswap", "base_model": llama_family["base"], "parameters": {"t": 0.01},
              "models": [{"model": llama_family["base"]}, {"model": llama_family["expert0"]}]}
    numel = 96 * 32
    needed = 2 * 4 * numel + 3 * 4 * numel + registry.get("nearswap").working_bytes(2, numel)
    with pytest.raises(SemeError, match="the method's temporaries"):
        seme.merge(recipe, str(tmp_path / "short"), progress=False, max_memory=needed - 1)
    seme.merge(recipe, str(tmp_path / "enough"), progress=False, max_memory=needed)
    seme.merge(recipe, str(tmp_path / "default"), progress=False)  # the default fits the largest tensor
    # a fused kernel's merge holds no temporaries of that size: TIES fits where its reference would not
    ties = {"merge_method": "ties", "base_model": llama_family["base"], "parameters": {"weight": 1.0, "density": 0.5},
            "models": [{"model": llama_family["expert0"]}]}
    seme.merge(ties, str(tmp_path / "fused"), progress=False, max_memory=5 * 4 * numel)
    with pytest.raises(SemeError, match="the method's temporaries"):
        seme.merge(ties, str(tmp_path / "reference"), progress=False, max_memory=5 * 4 * numel, backend="reference")


def test_max_memory_counts_the_seme_alignment_prepass(tmp_path, capsys):
    """Wide, short heads (600 x 512) aligned by probability: each model's G⁻¹, the alignment's d x d matrices
    and its anchors outweigh any one tensor's merge. Below what the pre-pass needs, a one-line error before
    anything is read or written."""
    import torch

    import seme
    from conftest import build_model
    from seme.config import load
    from seme.errors import SemeError
    from seme.executor import least_memory
    from seme.plan import make_plan

    paths = [str(tmp_path / f"m{i}") for i in range(2)]
    for i, path in enumerate(paths):
        build_model(path, "llama", seed=i, layers=1, hidden=512, vocab=600, dtype=torch.bfloat16)
    recipe = {"merge_method": "seme", "base_model": paths[0], "models": [{"model": paths[1]}],
              "parameters": {"alignment": "always", "align_mode": "probability"}}
    loop, prepass = least_memory(make_plan(load(recipe)), "cpu", "auto")
    assert prepass > loop
    out = tmp_path / "out"
    with pytest.raises(SemeError, match="below what SeMe's alignment pre-pass needs"):
        seme.merge(recipe, str(out), max_memory=prepass - 1, progress=False)
    assert not out.exists() and not (tmp_path / "out.seme-partial").exists()
    seme.merge(recipe, str(tmp_path / "plan"), dry_run=True)
    assert f"; the least --max-memory takes: {prepass} bytes" in capsys.readouterr().out
    seme.merge(recipe, str(out), max_memory=prepass, progress=False)
    assert (out / "model.safetensors").exists()
