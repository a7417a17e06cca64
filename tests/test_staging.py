"""Staging of a GPU merge's inputs (`seme.staging`), driven on the CPU: order, the byte budget, errors
and shutdown, and whole merges through the executor with the same bytes as unstaged ones."""
from __future__ import annotations

import os
import re
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import seme
from seme import engine
from seme.errors import SemeError
from seme.staging import InputStager

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(InputStager, "chunk", 1000)  # tensors of a few KB span several chunks


def _tasks(sizes, seed=0):
    """Tasks with inputs of the given sizes (elements; None: an input not to stage) and mixed dtypes."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    tasks = []
    for i, row in enumerate(sizes):
        inputs = [None if n is None else torch.randn(n, generator=g).to(dtypes[(i + j) % 4])
                  for j, n in enumerate(row)]
        tasks.append(SimpleNamespace(inputs=inputs))
    return tasks


def _stager(tasks, budget, reads=None):
    reads = [] if reads is None else reads
    return InputStager(CPU, tasks, lambda task: task.inputs, budget,
                       lambda seconds, nbytes: reads.append((seconds, nbytes)))


def _nbytes(task):
    return sum(t.nbytes for t in task.inputs if t is not None)


def test_inputs_arrive_in_task_order_as_copies():
    tasks = _tasks([[3000, 3000, None], [7, 0], [1], [2500, 10, 4000]])
    reads = []
    with _stager(tasks, 10**9, reads) as stager:
        with pytest.raises(RuntimeError, match="out of their staging order"):
            stager.get(tasks[1])
        for task in tasks:
            got = stager.get(task)
            assert len(got) == len(task.inputs)
            for t, source in zip(got, task.inputs):
                if source is None:
                    assert t is None
                    continue
                assert t.dtype == source.dtype and t.shape == source.shape and torch.equal(t, source)
                assert t.data_ptr() != source.data_ptr() or not t.numel()
    assert sum(n for _, n in reads) == sum(_nbytes(t) for t in tasks)  # the read stage saw every byte
    assert all(s >= 0 for s, _ in reads)


@pytest.mark.parametrize("budget", [0, 12_000, 30_000, 10**9])
def test_the_budget_bounds_the_bytes_read_ahead_of_the_merged_task(budget, monkeypatch):
    tasks = _tasks([[2000, 2000], [500], [3000, 100, 100], [1500, 1500], [10], [4000], [800, 800]])
    read, lock, original = [0], threading.Lock(), InputStager._read

    def counted(self, source, target):
        with lock:
            read[0] += source.numel()
        return original(self, source, target)

    monkeypatch.setattr(InputStager, "_read", counted)
    with _stager(tasks, budget) as stager:
        for i, task in enumerate(tasks):
            got = stager.get(task)
            assert all(torch.equal(t, s) for t, s in zip(got, task.inputs))
            # ahead: what is staged for later tasks, within the budget; and staging is greedy
            assert stager.ahead == sum(_nbytes(t) for t, *_ in stager.staged) <= budget
            if stager.pending:
                assert stager.ahead + _nbytes(stager.pending[0]) > budget
            time.sleep(0.01)  # the readers run ahead while the task "merges"
            with lock:
                assert read[0] <= sum(_nbytes(t) for t in tasks[:i + 1]) + budget
            if budget == 10**9:
                assert not stager.pending
            if budget == 0:
                assert not stager.staged


def test_a_readers_exception_is_raised_by_get_and_close_does_not_wait_for_the_reads_queued(monkeypatch):
    tasks = _tasks([[1000]] + [[3000, 3000]] * 40)  # 260 chunks behind the first task
    original = InputStager._read

    def failing(self, source, target):
        if source.data_ptr() == tasks[0].inputs[0].data_ptr():
            raise ValueError("the disk fell off")
        time.sleep(0.1)  # all of them: about 6 s with 4 readers
        return original(self, source, target)

    monkeypatch.setattr(InputStager, "chunk", 4000)
    monkeypatch.setattr(InputStager, "_read", failing)
    stager = _stager(tasks, 10**9)
    with pytest.raises(ValueError, match="the disk fell off"):
        stager.get(tasks[0])
    start = time.perf_counter()
    closing = threading.Thread(target=stager.close)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive() and time.perf_counter() - start < 2


def test_results_are_copied_back_whole():
    stager = InputStager(CPU, [], lambda task: [], 0, lambda seconds, nbytes: None)
    for n in (1, 999, 1000, 4321):
        result = torch.randn(n)
        out = bytearray(result.nbytes)
        stager.put(result, memoryview(out))
        assert torch.equal(torch.frombuffer(out, dtype=torch.float32), result)
    stager.close()


def test_the_buffers_stay_within_what_max_memory_counts_for_them(llama_family):
    # The pinned buffers of a GPU merge (160 MiB) were outside --max-memory.
    from seme import executor

    tasks = _tasks([[40_000, 40_000, 25_000], [30_000] * 4])  # chunks for every reader
    with _stager(tasks, 10**9) as stager:
        for task in tasks:
            stager.get(task)
        for n in (500, 4321):
            stager.put(torch.randn(n), memoryview(bytearray(4 * n)))
    entries = [stager._buffers.get() for _ in range(2 * InputStager.readers)]  # every buffer it can make
    held = sum(b.nbytes for b, _ in entries if b is not None) + sum(b.nbytes for b in stager._out if b is not None)
    assert stager._buffers.empty() and 0 < held <= InputStager.host_bytes()
    plan = _plan(_recipes(llama_family)["ties"])
    loop = executor.least_memory(plan, "cuda", "auto")[0]
    assert loop == executor.largest_need(plan, "cuda", "auto")[0] + InputStager.host_bytes()
    assert executor.least_memory(plan, "cpu", "auto")[0] == executor.largest_need(plan, "cpu", "auto")[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_staging_to_a_gpu_gives_the_inputs_and_takes_back_the_results():
    device = torch.device("cuda")
    tasks = _tasks([[3000, 3000, None], [7, 0], [1], [2500, 10, 4000]] * 3)
    with InputStager(device, tasks, lambda task: task.inputs, 20_000, lambda seconds, nbytes: None) as stager:
        for task in tasks:
            for t, source in zip(stager.get(task), task.inputs):
                assert (t is None) == (source is None)
                if t is not None:
                    assert t.device.type == "cuda" and torch.equal(t.cpu(), source)
                    doubled = t.double() * 2  # a kernel on the merge's stream
                    out = bytearray(doubled.nbytes)
                    if out:
                        stager.put(doubled, memoryview(out))
                        assert torch.equal(torch.frombuffer(out, dtype=torch.float64), source.double() * 2)


# --- whole merges through the executor ----------------------------------------------------------

def _shards(folder) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.startswith("model")}


def _torch_engines(monkeypatch, stage: bool) -> list:
    """Merges run on TorchEngines staging (or not) on the CPU; the engines made, in order."""
    made = []

    def make(plan, device, backend, world, allow_nonfinite):
        made.append(engine.TorchEngine(plan, device, backend, stage=stage, allow_nonfinite=allow_nonfinite))
        return made[-1]

    monkeypatch.setattr("seme.executor.make_engine", make)
    return made


def _merge(monkeypatch, recipe: dict, out, stage: bool) -> dict[str, bytes]:
    made = _torch_engines(monkeypatch, stage)
    seme.merge(recipe, str(out), out_shard_size="40KB", progress=False)
    assert (made[0].stager is not None) == stage
    return _shards(out)


def _recipes(family):
    experts = [{"model": family[f"expert{i}"]} for i in range(3)]
    return {
        "ties": {"merge_method": "ties", "base_model": family["base"], "out_dtype": "bfloat16",
                 "parameters": {"weight": 1.0, "density": 0.4}, "models": experts},
        "dare_linear": {"merge_method": "dare_linear", "base_model": family["base"], "dtype": "bfloat16",
                        "random_seed": 2, "parameters": {"weight": 0.5, "density": 0.5}, "models": experts},
        "slerp": {"merge_method": "slerp", "base_model": family["base"], "parameters": {"t": 0.3},
                  "models": [{"model": family["base"]}, experts[0]]},
        "seme": {"merge_method": "seme", "base_model": family["base"], "parameters": {"select_topk": 0.5},
                 "models": experts},
    }


@pytest.mark.parametrize("method", ["ties", "dare_linear", "slerp", "seme"])
def test_staged_merges_write_the_bytes_of_unstaged_ones(llama_family, tmp_path, monkeypatch, method):
    recipe = _recipes(llama_family)[method]
    staged = _merge(monkeypatch, recipe, tmp_path / "staged", stage=True)
    plain = _merge(monkeypatch, recipe, tmp_path / "plain", stage=False)
    assert staged.keys() == plain.keys() and len(staged) > 2
    for f in staged:
        assert staged[f] == plain[f], f


def test_a_read_failing_midway_fails_the_merge_in_one_line(llama_family, tmp_path, monkeypatch):
    calls, original = [0], InputStager._read

    def failing(self, source, target):
        calls[0] += 1
        if calls[0] >= 30:
            raise OSError(5, "Input/output error")
        return original(self, source, target)

    monkeypatch.setattr(InputStager, "_read", failing)
    with pytest.raises(SemeError, match="Input/output error.*rerun with --resume"):
        _merge(monkeypatch, _recipes(llama_family)["ties"], tmp_path / "out", stage=True)


@pytest.mark.parametrize("remap", ["lora", "vocabulary"])
def test_staged_merges_of_adapted_and_remapped_inputs_write_the_same_bytes(llama_family, tmp_path, monkeypatch, remap):
    # a LoRA adapter's update and a vocabulary re-mapping are applied to staged inputs too
    from test_lora import make_adapter
    from test_vocabulary import renumbered

    if remap == "lora":
        adapter, _ = make_adapter(llama_family["expert0"], tmp_path, seed=5)
        first, extra = f"{llama_family['expert0']}+{adapter}", {}
    else:
        first, extra = renumbered(llama_family["expert0"], tmp_path / "renumbered"), {"tokenizer_source": "base"}
    recipe = {"merge_method": "ties", "base_model": llama_family["base"], **extra,
              "parameters": {"weight": 0.5, "density": 0.5},
              "models": [{"model": first}, {"model": llama_family["expert1"]}]}
    staged = _merge(monkeypatch, recipe, tmp_path / "staged", stage=True)
    plain = _merge(monkeypatch, recipe, tmp_path / "plain", stage=False)
    assert staged.keys() == plain.keys()
    for f in staged:
        assert staged[f] == plain[f], f


# --- tensors too large for the GPU's free memory ----------------------------------------------------

def _plan(recipe):
    from seme.config import load
    from seme.plan import make_plan

    return make_plan(load(recipe))


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_device_bytes_count_inputs_result_and_the_methods_temporaries(llama_family, method):
    import math

    from seme.methods import registry

    plan = _plan(_recipes(llama_family)[method])
    for task in plan.tasks:
        numel = math.prod(task.shape)
        staged = sum(plan.models[m].tensors[n].nbytes for m, n in task.inputs)
        result = task.nbytes
        # fused: inputs, result and the kernels' scratch; plain torch: the method's declared peak
        fused = engine.device_bytes(plan, task, fused=True)
        assert fused == staged + result + (len(task.inputs) if method == "ties" else 0) * numel  # a cut a model
        temporaries = registry.get(method).working_bytes(len(task.inputs), numel)
        assert engine.device_bytes(plan, task, fused=False) == staged + result + temporaries > fused


def _routed_merge(monkeypatch, recipe, out, free):
    """A staged merge on the CPU as on a GPU with `free` bytes free; the engine."""
    made = _torch_engines(monkeypatch, stage=True)
    monkeypatch.setattr(engine, "device_memory", lambda device: (free, 10 * free))
    seme.merge(recipe, str(out), out_shard_size="40KB", progress=False)
    return made[0]


def test_tensors_too_large_for_the_gpu_are_merged_on_the_cpu_with_the_same_bytes(llama_family, tmp_path, monkeypatch,
                                                                                 capsys):
    recipe = _recipes(llama_family)["ties"]
    plan = _plan(recipe)
    needs = {t.name: engine.device_bytes(plan, t, fused=True) for t in plan.tasks if not t.copy}
    room = sorted(needs.values())[-3] + 1  # the two largest tensors do not fit
    staged = []
    original = InputStager.get

    def get(self, task):
        staged.append(task.name)
        return original(self, task)

    monkeypatch.setattr(InputStager, "get", get)
    made = _routed_merge(monkeypatch, recipe, tmp_path / "routed", free=room / engine.DEVICE_ROOM + 1)
    assert re.search(r"seme: warning: 2 tensor\(s\) .*merged on the CPU", capsys.readouterr().err)
    too_large = {name for name, need in needs.items() if need > room}
    assert made.on_host == too_large and len(too_large) == 2 and made._host is not None
    assert set(staged) == set(needs) - too_large  # the others were staged as on the GPU
    plain = _merge(monkeypatch, recipe, tmp_path / "plain", stage=False)
    routed = _shards(tmp_path / "routed")
    assert routed.keys() == plain.keys()
    for f in routed:
        assert routed[f] == plain[f], f


def test_a_seme_tensor_too_large_for_the_gpu_is_refused_in_one_line(llama_family, tmp_path, monkeypatch):
    with pytest.raises(SemeError, match=r"merging '.*' needs [\d.]+ [kMG]B of cpu's memory, 850 bytes are free.*--device cpu"):
        _routed_merge(monkeypatch, _recipes(llama_family)["seme"], tmp_path / "out", free=1000)


def test_max_memory_counts_the_cpu_temporaries_of_tensors_too_large_for_the_gpu(llama_family, tmp_path, monkeypatch):
    from seme import executor

    recipe = {"merge_method": "nearswap", "base_model": llama_family["base"], "parameters": {"t": 0.01},
              "models": [{"model": llama_family["base"]}, {"model": llama_family["expert0"]}]}
    plan = _plan(recipe)
    on_gpu, _ = executor.largest_need(plan, "cuda", "auto")  # a GPU merge's host memory: no temporaries
    on_cpu, name = executor.largest_need(plan, "cpu", "auto")
    assert on_cpu > on_gpu
    _torch_engines(monkeypatch, stage=True)
    monkeypatch.setattr(engine, "device_memory", lambda device: (1000, 10**9))  # nothing fits: all on the CPU
    monkeypatch.setattr(executor, "largest_need", lambda plan, device, backend, tasks=None, native=None:
                        (on_gpu, name) if tasks is None else (on_cpu, name))  # planned as a GPU merge
    with pytest.raises(SemeError, match=rf"--max-memory .* below what '{name}' needs merged on the CPU"):
        seme.merge(recipe, str(tmp_path / "out"), max_memory=on_gpu + InputStager.host_bytes(), progress=False)


def test_a_gpu_dry_run_prints_the_gpu_memory_of_the_largest_merge(llama_family, tmp_path, capsys):
    import yaml

    from seme.backend import implementation
    from seme.merge import main

    recipe = _recipes(llama_family)["ties"]
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), str(tmp_path / "out"), "--device", "cuda", "--dry-run"]) == 0
    plan = _plan(recipe)
    fused = implementation("ties", "auto", torch.device("cuda"))[1]  # what this install would run on a GPU
    need, name = max((engine.device_bytes(plan, t, fused), t.name) for t in plan.tasks if not t.copy)
    assert f"cuda memory: {need} bytes ({need / 2**20:.1f} MiB) for the largest tensor's merge, {name} (" \
           in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
