"""torchrun with 2 gloo processes on CPU: each rank writes its share of the tensors, pieces of the
same shards; the result is bit-identical to a single-process merge."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml

from seme.distributed import split
from seme.merge import main


def test_tensors_are_shared_in_contiguous_runs_with_the_least_largest_run():
    import itertools
    import random

    assert split([10, 1, 1, 8, 2], 2) == [0, 0, 1, 1, 1]  # runs of 12 and 10
    assert split([5, 5, 5, 5], 4) == [0, 1, 2, 3]
    assert split([3], 2) == [0] and split([], 3) == [] and split([0, 0], 2) == [0, 0]
    rng = random.Random(0)
    for _ in range(200):  # against every way to cut the tensors into at most `world` runs
        sizes = [rng.choice([0, 1, 2, 5, 40]) for _ in range(rng.randint(1, 7))]
        world = rng.randint(1, 4)
        owner = split(sizes, world)
        assert owner[0] == 0 and all(0 <= b - a <= 1 for a, b in zip(owner, owner[1:])) and owner[-1] < world
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                   for k in range(world) for cuts in itertools.combinations(range(1, len(sizes)), k))
        assert max(sum(s for s, r in zip(sizes, owner) if r == rank) for rank in set(owner)) == best


needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed")


def torchrun(port: int, *args, env=None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGS` (`-m seme.merge ...`, or a script and its arguments)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def torchrun_script(port: int, folder, source: str, *args) -> subprocess.CompletedProcess:
    """torchrun of a script (`source`: it patches seme, then runs seme.merge's command line) with ARGS."""
    script = folder / "rank_script.py"
    script.write_text(source)
    return torchrun(port, script, *args, env={"PYTHONPATH": os.pathsep.join([
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])})


def ties(family) -> dict:
    return {"merge_method": "ties", "base_model": family["base"], "parameters": {"weight": 1.0, "density": 0.4},
            "models": [{"model": family[f"expert{i}"]} for i in range(3)]}


@needs_torchrun
@pytest.mark.parametrize("stages,shard_size,port", [(1, "40KB", 29518), (2, "40KB", 29519),
                                                     (1, "5GB", 29523)])  # 5GB: one shard, a piece of it each
def test_two_gloo_ranks_give_the_single_process_bytes(llama_family, tmp_path, stages, shard_size, port):
    recipe = tmp_path / "recipe.yml"
    if stages == 1:
        recipe.write_text(yaml.safe_dump(ties(llama_family)))
    else:  # a multi-stage recipe: the ranks merge each stage together, in turn. The final one is
        # SeMe's, whose report holds every tensor's statistics, whichever rank merged it.
        final = {"merge_method": "seme", "base_model": "first",
                 "models": [{"model": llama_family["expert0"]}, {"model": llama_family["expert1"]}]}
        recipe.write_text(yaml.safe_dump({"name": "first", **ties(llama_family)}) + "---\n" + yaml.safe_dump(final))
    single = tmp_path / "single" / "out"
    assert main([str(recipe), str(single), "--out-shard-size", shard_size]) == 0
    multi = tmp_path / "multi" / "out"
    proc = torchrun(port, "-m", "seme.merge", recipe, multi, "--out-shard-size", shard_size)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("seme: merged") == stages and "nothing to merge" not in proc.stderr  # both ranks wrote
    files = sorted(os.listdir(single))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert files == sorted(os.listdir(multi)) and (len(shards) == 1 if shard_size == "5GB" else len(shards) > 2)
    for f in files:  # SeMe's report names its pivot, the first stage's folder beside each output
        expected = (single / f).read_bytes().replace(str(single).encode(), str(multi).encode())
        assert expected == (multi / f).read_bytes(), f


@needs_torchrun
def test_what_every_rank_meets_is_said_once(llama_family, tmp_path):
    # Every rank plans the same merge: each printed the recipe's warnings and its errors.
    recipe = tmp_path / "recipe.yml"
    shared = ties(llama_family)
    shared["models"][0]["parameters"] = {"normalize": False}  # a warning: normalize is shared by all models
    recipe.write_text(yaml.safe_dump(shared))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a merge")
    proc = torchrun(29520, "-m", "seme.merge", recipe, tmp_path / "out")
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("seme:")]
    assert len(said) == 2 and "'normalize' of expert0" in said[0], said
    assert said[1] == f"seme: error: output folder {tmp_path / 'out'} exists and is not empty (use --overwrite to replace it)"


def test_a_rank_tells_rank_0_of_its_error_before_it_ends(llama_family, tmp_path, capsys, monkeypatch):
    # Rank 0 alone says the errors, which every rank meets while planning: it must hear of them
    # before another rank's exit makes torchrun end it.
    from seme import distributed

    class Rank1Of2(distributed.Group):
        def agree(self, error, said=()):
            told.append(error)

    told = []
    monkeypatch.setattr(distributed, "current", lambda: Rank1Of2(1, 2, 1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(llama_family)))
    assert main([str(recipe), str(tmp_path / "out"), "--max-memory", "1KB"]) == 2
    assert capsys.readouterr().err == "" and len(told) == 1 and told[0].startswith("--max-memory 1.0 kB is below")


def test_ranks_left_without_tensors_are_said(llama_family, tmp_path, capsys, monkeypatch):
    # More ranks than the output's runs of tensors: the idle ones are said (rank 0's view here).
    import re

    from seme import distributed

    class Rank0Of500(distributed.Group):
        def agree(self, error, said=()):  # the other ranks met nothing
            for message in said:
                warnings.warn(message)
            return error

    monkeypatch.setattr(distributed, "current", lambda: Rank0Of500(0, 500, 0))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(llama_family)))
    assert main([str(recipe), str(tmp_path / "out")]) == 0
    said = [re.fullmatch(r"seme: warning: (\d+) of the 500 ranks have nothing to merge: the output's (\d+) tensor\(s\) "
                         r"are shared in runs by bytes, and (\d+) rank\(s\) already merge them as fast as 500 would", line)
            for line in capsys.readouterr().err.splitlines()]
    idle, tensors, busy = map(int, next(m for m in said if m).groups())
    assert idle + busy == 500 and 1 < busy < tensors


FAILING_RANK = """
import os, sys, time
import seme.engine
from seme.merge import run

real = seme.engine.TorchEngine.merge

def merge(self, task, out):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected on " + task.name)
    time.sleep(0.3)  # rank 0 is slow: it would merge its whole share before hearing of rank 1
    return real(self, task, out)

seme.engine.TorchEngine.merge = merge
run()
"""


@needs_torchrun
def test_a_failing_rank_stops_the_others_which_say_why(llama_family, tmp_path):
    # An exception other than seme's on one rank (a bug, an interruption) let the others merge their
    # whole share and then fail with a traceback of their own (the connection it closed); an error on
    # one rank was said by every rank once all had merged their share.
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(llama_family)))
    out = tmp_path / "out"
    proc = torchrun_script(29522, tmp_path, FAILING_RANK, recipe, out, "--out-shard-size", "1")
    assert proc.returncode != 0 and not out.exists()
    said = [line for line in proc.stderr.splitlines() if line.startswith("seme:")]
    assert len(said) == 1 and said[0].startswith("seme: error: rank 1 failed: RuntimeError: injected on "), said
    assert "[rank0]" not in proc.stderr and "Connection closed" not in proc.stderr
    manifest = f"{out}.seme-partial/seme-manifest.0.json"  # written once a piece is finished
    if os.path.exists(manifest):
        with open(manifest) as f:
            assert len(json.load(f)["pieces"]) <= 2  # of the 10 or so shards of its share


RANK_1_FAILS_LATE = """
import os, time
import seme.engine
from seme.merge import run

real = seme.engine.TorchEngine.merge
merged = []

def merge(self, task, out):
    merged.append(task.name)
    if os.environ["RANK"] == "1" and len(merged) == 4:  # after finishing some of its pieces
        time.sleep(3)  # and rank 0 all of its own (else its stop at its next tensor could leave none finished)
        raise RuntimeError("injected on " + task.name)
    return real(self, task, out)

seme.engine.TorchEngine.merge = merge
run()
"""


@needs_torchrun
@pytest.mark.parametrize("resumed_by", ["two ranks", "one process"])
def test_a_torchrun_merge_resumes_from_the_pieces_its_ranks_finished(llama_family, tmp_path, resumed_by,
                                                                     monkeypatch):
    from seme.io.writer import ShardWriter

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(llama_family)))
    single = tmp_path / "single"
    assert main([str(recipe), str(single), "--out-shard-size", "20KB"]) == 0
    out = tmp_path / "out"
    port = 29524 if resumed_by == "two ranks" else 29526
    proc = torchrun_script(port, tmp_path, RANK_1_FAILS_LATE, recipe, out, "--out-shard-size", "20KB")
    assert proc.returncode != 0 and "injected on" in proc.stderr
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "out.seme-partial").glob("seme-manifest.*.json")]
    assert any(m["pieces"] for m in manifests)
    if resumed_by == "two ranks":
        proc = torchrun(port + 1, "-m", "seme.merge", recipe, out, "--out-shard-size", "20KB", "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # one piece per shard now: the shards the ranks' recorded pieces cover are kept
        written = []
        monkeypatch.setattr(ShardWriter, "written", lambda self, name, real=ShardWriter.written: (
            written.append(name), real(self, name)))
        assert main([str(recipe), str(out), "--out-shard-size", "20KB", "--resume"]) == 0
        assert 0 < len(written) < len(json.loads((single / "model.safetensors.index.json").read_text())["weight_map"])
    files = sorted(os.listdir(single))
    assert files == sorted(os.listdir(out)) and len([f for f in files if f.endswith(".safetensors")]) > 2
    for f in files:
        if f.endswith((".safetensors", ".index.json")):
            assert (single / f).read_bytes() == (out / f).read_bytes(), f


@needs_torchrun
def test_ranks_share_semes_alignments_and_an_error_in_one_stops_all(llama_family, tmp_path):
    # Each rank aligns its share of SeMe's sources (above: bit-identical) and the ranks exchange the
    # rotations; a source that cannot be aligned on rank 1 (a zero head) is said once, by rank 0.
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(llama_family["expert1"], tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"].zero_()
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": llama_family["base"], "models": [
        {"model": llama_family["expert0"]}, {"model": str(broken)}]}))  # rank 0 aligns expert0, rank 1 broken
    out = tmp_path / "out"
    proc = torchrun(29528, "-m", "seme.merge", recipe, out)
    assert proc.returncode != 0 and not out.exists()
    said = [line for line in proc.stderr.splitlines() if line.startswith("seme:")]
    assert said == ["seme: error: SeMe: the LM head of broken, scaled by its final norm's gains, is zero: it has "
                    "no semantic bases"], proc.stderr[-3000:]
    assert "[rank" not in proc.stderr and "Connection closed" not in proc.stderr  # no rank's traceback


RANK_1_CANNOT_PLAN = """
import os
import seme.plan
from seme.errors import SemeError
from seme.merge import run

real = seme.plan.make_plan

def make_plan(recipe):
    if os.environ["RANK"] == "1":
        raise SemeError("rank 1 cannot read a model its node lacks")
    return real(recipe)

seme.plan.make_plan = make_plan
run()
"""


@needs_torchrun
def test_a_dry_run_hears_of_a_rank_that_could_not_plan(llama_family, tmp_path):
    # A dry run merges nothing, so the ranks never agreed: rank 0 printed the plan and ended while
    # rank 1 waited to tell it of its error, and torchrun waited for rank 1 (past this test's 300 s).
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(llama_family)))
    proc = torchrun_script(29530, tmp_path, RANK_1_CANNOT_PLAN, recipe, tmp_path / "out", "--dry-run")
    assert proc.returncode != 0 and "method: ties" in proc.stdout  # rank 0 planned
    said = [line for line in proc.stderr.splitlines() if line.startswith("seme:")]
    assert said == ["seme: error: rank 1 cannot read a model its node lacks"], proc.stderr[-3000:]
    assert "[rank" not in proc.stderr and "Connection closed" not in proc.stderr


def test_world_size_without_torchrun_is_a_one_line_error(llama_family, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(llama_family)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("seme: error: WORLD_SIZE=2 asks for a merge over 2 processes")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a merge of one process says what it did, whatever RANK says
    monkeypatch.setenv("RANK", "1")
    assert main([str(recipe), str(tmp_path / "out")]) == 0
    assert "seme: merged" in capsys.readouterr().err


def test_under_torchrun_the_demo_models_are_built_by_rank_0_alone(tmp_path, capsys, monkeypatch):
    # Every rank built them into the same folder, rewriting files that a faster rank was merging.
    import seme
    import seme.demo
    from seme import distributed

    class Rank1(distributed.Group):
        def agree(self, error, said=()):
            built.append("agreed")

    built, merged = [], []
    monkeypatch.setattr(distributed, "current", lambda: Rank1(1, 2, 1))
    monkeypatch.setattr(seme.demo, "build_tiny_llama", lambda *a, **k: built.append(a))
    monkeypatch.setattr(seme, "merge", lambda recipe, out, **options: merged.append(recipe))
    seme.demo.run_demo(str(tmp_path / "out"))
    assert built == ["agreed"] and len(merged) == 1 and capsys.readouterr().err == ""


def test_ranks_exchange_over_gloo_on_gpus_too(monkeypatch):
    # NCCL, taken for merges on GPUs, exchanges objects on torch.cuda.current_device(), which no
    # rank had set before the first exchange: every rank would use GPU 0. The ranks exchange only
    # errors and warnings.
    import torch.distributed as dist

    from seme import distributed

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: backends.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed.current() == distributed.Group(1, 2, 0) and backends == ["gloo"]


def test_ranks_share_the_nodes_gpus(monkeypatch):
    # Two ranks on a one-GPU node (torchrun --nproc_per_node 2 ... --device cuda): rank 1 was sent to
    # cuda:1, which does not exist; ranks take the node's GPUs in turn, and an explicit cuda:N holds.
    import torch

    from seme import distributed
    from seme.executor import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ranks = [rank_device("cuda", distributed.Group(r, 3, r)) for r in range(3)]
    assert ranks == ["cuda:0", "cuda:1", "cuda:0"]
    assert rank_device("cuda:1", distributed.Group(0, 3, 0)) == "cuda:1"
    assert rank_device("cuda", distributed.Group(0, 1, 0)) == "cuda"
    assert rank_device("cpu", distributed.Group(1, 2, 1)) == "cpu"
