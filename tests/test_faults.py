"""Reliability: real merges killed with SIGKILL at random points resume to identical bytes, and
mutated recipes either merge or fail with one line and exit status 2 — never a traceback."""
from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seme.merge import main

# The child merges normally, except that its N-th low-level write (a tensor chunk, a header or
# the manifest's rename) writes half of its bytes and then SIGKILLs the process.
KILLER = """
import os, signal, sys
target = int(sys.argv[1])
count = [0]
real_pwrite, real_replace = os.pwrite, os.replace
def tick():
    count[0] += 1
    return count[0] == target
def pwrite(fd, data, offset):
    if tick():
        real_pwrite(fd, bytes(memoryview(data)[: len(memoryview(data)) // 2]), offset)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_pwrite(fd, data, offset)
def replace(src, dst):
    if tick():
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.pwrite, os.replace = pwrite, replace
from seme.merge import main
sys.exit(main(sys.argv[2:]))
"""


def folder_bytes(path) -> dict:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def recipe_file(llama_family, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "recipe.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": llama_family["base"], "random_seed": 5,
        "parameters": {"weight": 1.0, "density": 0.6},
        "models": [{"model": llama_family[f"expert{i}"]} for i in range(3)]}))
    return str(path)


@pytest.mark.parametrize("seed", range(6))
def test_killed_merge_resumes_to_identical_bytes(recipe_file, tmp_path, seed):
    reference = tmp_path / "reference" / "out"  # same folder name: the model card is titled by it
    assert main([recipe_file, str(reference), "--out-shard-size", "30KB"]) == 0
    writes = 3 * len([f for f in os.listdir(reference) if f.endswith(".safetensors")]) + 40
    target = random.Random(seed).randint(1, writes)
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", KILLER, str(target), recipe_file, str(out), "--out-shard-size", "30KB"],
                           capture_output=True, text=True)
    if child.returncode == 0:  # the kill point lay beyond the last write: nothing to resume
        assert folder_bytes(out) == folder_bytes(reference)
        return
    assert child.returncode == -9, child.stderr
    assert not out.exists(), "a killed merge must not publish its output"
    assert os.path.isdir(f"{out}.seme-partial")
    # Without --resume the leftover is refused, with a way forward.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([recipe_file, str(out), "--out-shard-size", "30KB"]) == 2
    assert "--resume" in err.getvalue()
    assert main([recipe_file, str(out), "--out-shard-size", "30KB", "--resume"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)
    assert not os.path.exists(f"{out}.seme-partial")


# The child merges normally, except that its N-th os.rename or os.unlink (the renames that publish
# the output, the deletion of the output it replaces) SIGKILLs the process.
PUBLISH_KILLER = """
import os, signal, sys
target = int(sys.argv[1])
count = [0]
def killing(real):
    def call(*args, **kwargs):
        count[0] += 1
        if count[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call
os.rename, os.unlink = killing(os.rename), killing(os.unlink)
from seme.merge import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("target", range(1, 6))
def test_a_merge_killed_while_replacing_an_output_never_leaves_it_half_deleted(recipe_file, tmp_path, target):
    # The output being replaced was deleted file by file before the rename: killed then, OUT kept its
    # index and config but lost shards. It is renamed aside instead, whole.
    reference = tmp_path / "reference" / "out"
    assert main([recipe_file, str(reference), "--out-shard-size", "30KB"]) == 0
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    child = subprocess.run([sys.executable, "-c", PUBLISH_KILLER, str(target), recipe_file, str(out),
                            "--out-shard-size", "30KB", "--overwrite"], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    assert not out.exists() or folder_bytes(out) == folder_bytes(reference)
    assert main([recipe_file, str(out), "--out-shard-size", "30KB", "--resume", "--overwrite"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)
    assert not [f for f in os.listdir(tmp_path) if ".seme-" in f]  # no staging folder, no replaced output


def test_a_merge_that_fails_while_publishing_resumes_with_its_shards(recipe_file, tmp_path, capsys, monkeypatch):
    # The manifests of finished shards were deleted before the metadata was written: a full disk
    # there, and --resume merged every shard again.
    import seme.executor

    reference = tmp_path / "reference" / "out"
    assert main([recipe_file, str(reference), "--out-shard-size", "30KB"]) == 0
    real = seme.executor.write_metadata

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(seme.executor, "write_metadata", full)
    out = tmp_path / "out"
    assert main([recipe_file, str(out), "--out-shard-size", "30KB"]) == 2
    assert "rerun with --resume" in capsys.readouterr().err
    staged = {f: os.stat(os.path.join(f"{out}.seme-partial", f)).st_mtime_ns
              for f in os.listdir(f"{out}.seme-partial") if f.endswith(".safetensors")}
    monkeypatch.setattr(seme.executor, "write_metadata", real)
    assert main([recipe_file, str(out), "--out-shard-size", "30KB", "--resume"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)
    assert len(staged) > 2 and {f: os.stat(out / f).st_mtime_ns for f in staged} == staged


def test_what_publication_writes_is_on_disk_before_the_rename_and_the_rename_after(recipe_file, tmp_path,
                                                                                  monkeypatch):
    # A power cut just after the rename could otherwise leave an output whose index or config is empty.
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b))[1])
    out = tmp_path / "out"
    assert main([recipe_file, str(out), "--out-shard-size", "30KB"]) == 0
    published = events.index(("rename", str(out)))
    synced_before = {os.path.basename(path) for kind, path in events[:published] if kind == "sync"}
    assert {"model.safetensors.index.json", "config.json", "README.md", f"{out.name}.seme-partial"} <= synced_before
    assert {f for f in os.listdir(out) if f.endswith(".safetensors")} <= synced_before  # as each shard finished
    assert ("sync", str(tmp_path)) in events[published:]


# The child merges with every shard write waiting until the file ARGV[1].go exists (ARGV[1].waiting
# says it waits): a merge in flight, held still.
PAUSED = """
import os, sys, time
real = os.pwrite
def pwrite(*args):
    open(sys.argv[1] + ".waiting", "w").close()
    while not os.path.exists(sys.argv[1] + ".go"):
        time.sleep(0.01)
    return real(*args)
os.pwrite = pwrite
from seme.merge import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_merge_into_the_same_output_is_refused_while_one_runs(recipe_file, tmp_path, capsys):
    # Unguarded, a second merge resuming, overwriting or starting beside a running one wrote into its
    # shards and deleted its files; the two published a mix of both (or a half-written folder).
    reference = tmp_path / "reference" / "out"
    assert main([recipe_file, str(reference), "--out-shard-size", "30KB"]) == 0
    out, flag = tmp_path / "out", str(tmp_path / "flag")
    first = subprocess.Popen([sys.executable, "-c", PAUSED, flag, recipe_file, str(out), "--out-shard-size", "30KB"],
                             stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(flag + ".waiting"):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        capsys.readouterr()
        for flags in [[], ["--resume"], ["--overwrite"], ["--resume", "--overwrite"]]:
            assert main([recipe_file, str(out), "--out-shard-size", "30KB", *flags]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"another merge into {out} is running" in err[0], (flags, err)
    finally:
        open(flag + ".go", "w").close()
        assert first.wait(timeout=120) == 0, first.stderr.read()
    assert folder_bytes(out) == folder_bytes(reference)


@pytest.mark.parametrize("changed", [["--out-shard-size", "20KB"], ["--backend", "reference"]])
def test_a_resume_with_other_settings_merges_anew_without_the_old_shards(recipe_file, tmp_path, changed):
    # Resumed with another shard size, the interrupted run's shards (model-0000N-of-0000M of another M)
    # were published beside the new ones; resumed with other kernels (whose bytes differ in rounding),
    # shards of both were mixed.
    settings = ["--out-shard-size", "30KB", *changed]
    reference = tmp_path / "reference" / "out"
    assert main([recipe_file, str(reference), *settings]) == 0
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", KILLER, "40", recipe_file, str(out), "--out-shard-size", "30KB"],
                           capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    assert main([recipe_file, str(out), *settings, "--resume"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)


def test_nonfinite_input_is_an_error_naming_it(llama_family, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(llama_family["expert0"]):
        src = os.path.join(llama_family["expert0"], f)
        if f != "model.safetensors":
            (broken / f).write_bytes(open(src, "rb").read())
    state = load_file(os.path.join(llama_family["expert0"], "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(broken), "parameters": {"weight": 1.0}}, {"model": llama_family["base"], "parameters": {"weight": 1.0}}]}))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("seme: error: input tensor 'model.layers.1.mlp.up_proj.weight' of broken "
                                       "contains NaN or Inf (pass --allow-nonfinite to merge it anyway)\n")
    assert not (tmp_path / "out").exists()
    assert main([str(recipe), str(tmp_path / "out"), "--allow-nonfinite", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "seme: warning: input tensor 'model.layers.1.mlp.up_proj.weight' of broken contains NaN or Inf" in err
    assert torch.isnan(load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]).any()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nonfinite_output_of_finite_inputs_is_an_error(llama_family, tmp_path, capsys, backend):
    # weights whose sum overflows float16 (the norms' weights are 1): finite inputs, an Inf output
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "out_dtype": "float16", "models": [
        {"model": llama_family["expert0"], "parameters": {"weight": 1e5}},
        {"model": llama_family["base"], "parameters": {"weight": 1e5}}], "parameters": {"normalize": False}}))
    assert main([str(recipe), str(tmp_path / "out"), "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seme: error: the merged tensor '") and "contains NaN or Inf (pass --allow-nonfinite" in err
    assert "input tensor" not in err


def test_full_disk_is_found_before_starting(llama_family, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": llama_family["expert0"], "parameters": {"weight": 1.0}},
        {"model": llama_family["base"], "parameters": {"weight": 1.0}}]}))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    # nothing left behind: an empty staging folder made the rerun ask for --resume or --overwrite
    assert os.listdir(tmp_path) == ["r.yml"]


def test_an_output_published_while_a_merge_starts_is_not_replaced(recipe_file, tmp_path, capsys, monkeypatch):
    # The output was checked before the staging folder was locked: a merge into the same folder that
    # published in between had its output replaced without --overwrite.
    import seme.executor as executor

    out = tmp_path / "out"
    real_lock = executor._lock

    def publish_first(staging, out_dir):
        os.makedirs(out, exist_ok=True)
        (out / "config.json").write_text("{}")  # the other merge's output, published just now
        return real_lock(staging, out_dir)

    monkeypatch.setattr(executor, "_lock", publish_first)
    assert main([recipe_file, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0], err
    assert os.listdir(out) == ["config.json"] and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("call,errno_", [("fsync", errno.EIO), ("pwrite", errno.ENOSPC)])
def test_write_error_mid_merge_keeps_the_staging_folder(llama_family, tmp_path, capsys, monkeypatch, call, errno_):
    # Shards' blocks are reserved up front, but a tensor's write or a shard's flush to the device
    # can still fail mid-merge (on a thin-provisioned or failing disk).
    real = getattr(os, call)
    calls = [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 8:
            raise OSError(errno_, os.strerror(errno_))
        return real(*args)

    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": llama_family["expert0"], "parameters": {"weight": 1.0}},
        {"model": llama_family["base"], "parameters": {"weight": 1.0}}]}))
    reference = tmp_path / "reference"
    assert main([str(recipe), str(reference), "--out-shard-size", "30KB"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(os, call, failing)
    assert main([str(recipe), str(tmp_path / "out"), "--out-shard-size", "30KB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.strerror(errno_) in err[0] and "rerun with --resume" in err[0]
    assert os.path.isdir(tmp_path / "out.seme-partial") and not (tmp_path / "out").exists()
    monkeypatch.setattr(os, call, real)
    assert main([str(recipe), str(tmp_path / "out"), "--out-shard-size", "30KB", "--resume"]) == 0
    for f in os.listdir(reference):
        if f.endswith((".safetensors", ".index.json")):  # the card names its folder
            assert (tmp_path / "out" / f).read_bytes() == (reference / f).read_bytes(), f


def test_a_resumed_merge_needs_disk_space_only_for_what_it_has_left(recipe_file, tmp_path, capsys, monkeypatch):
    # The free space asked of a resumed merge was the whole output's, the shards already written not
    # counted: freeing what the rest needs after a full disk was not enough to resume.
    import shutil

    reference = tmp_path / "reference" / "out"
    assert main([recipe_file, str(reference), "--out-shard-size", "30KB"]) == 0
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", KILLER, "40", recipe_file, str(out), "--out-shard-size", "30KB"],
                           capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    output = sum(os.path.getsize(reference / f) for f in os.listdir(reference) if f.endswith(".safetensors"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10**6 + output // 2))
    assert main([recipe_file, str(tmp_path / "other"), "--out-shard-size", "30KB"]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert main([recipe_file, str(out), "--out-shard-size", "30KB", "--resume"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)


def test_buffered_writes_give_the_same_shards(llama_family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": llama_family["base"], "models": [
        {"model": llama_family["expert0"], "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": llama_family["expert1"], "parameters": {"weight": 0.5, "density": 0.5}}]}))
    assert main([str(recipe), str(tmp_path / "direct"), "--out-shard-size", "30KB"]) == 0
    assert main([str(recipe), str(tmp_path / "buffered"), "--out-shard-size", "30KB", "--buffered-writes"]) == 0
    files = sorted(os.listdir(tmp_path / "direct"))
    assert files == sorted(os.listdir(tmp_path / "buffered"))
    for f in files:
        if f.endswith((".safetensors", ".index.json")):
            assert (tmp_path / "direct" / f).read_bytes() == (tmp_path / "buffered" / f).read_bytes(), f


def test_without_reserved_blocks_the_shards_are_the_same(llama_family, tmp_path, monkeypatch):
    # Where posix_fallocate is unsupported the shards are only sized (sparse): every byte must still
    # be written.
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": llama_family["base"], "models": [
        {"model": llama_family["expert0"], "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": llama_family["expert1"], "parameters": {"weight": 0.5, "density": 0.5}}]}))
    assert main([str(recipe), str(tmp_path / "reserved"), "--out-shard-size", "30KB"]) == 0

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    assert main([str(recipe), str(tmp_path / "sparse"), "--out-shard-size", "30KB"]) == 0
    files = sorted(os.listdir(tmp_path / "reserved"))
    assert files == sorted(os.listdir(tmp_path / "sparse"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2
    for f in shards + ["model.safetensors.index.json"]:
        assert (tmp_path / "reserved" / f).read_bytes() == (tmp_path / "sparse" / f).read_bytes(), f


# --- property-based: mutated recipes ------------------------------------------------------------

def valid_recipe(m) -> dict:
    return {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": m["expert0"], "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": m["expert1"], "parameters": {"weight": [0.5, 1.0], "density": 0.7}}]}


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-2, 2, allow_nan=False), st.text(max_size=5),
                 st.lists(st.integers(-3, 3), max_size=3), st.just({}), st.just("/nonexistent/path"))


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["replace", "delete", "add_key", "negative_density", "layer_range", "empty_models"]))
    return kind, draw(st.integers(0, 10**6)), draw(JUNK), draw(st.text(min_size=1, max_size=8))


def mutate(recipe: dict, mutation) -> dict:
    kind, pick, junk, key = mutation
    recipe = copy.deepcopy(recipe)
    if kind == "negative_density":
        recipe["models"][pick % 2]["parameters"]["density"] = -abs(junk) if isinstance(junk, float) else -0.5
        return recipe
    if kind == "layer_range":
        return {"merge_method": "passthrough", "slices": [{"sources": [
            {"model": recipe["base_model"], "layer_range": [pick % 5 - 1, (pick // 5) % 5]}]}]}
    if kind == "empty_models":
        recipe["models"] = []
        return recipe
    all_paths = [p for p in paths(recipe) if p]
    path = all_paths[pick % len(all_paths)]
    parent = recipe
    for step in path[:-1]:
        parent = parent[step]
    if kind == "replace":
        parent[path[-1]] = junk
    elif kind == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[key] = junk
    return recipe


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutation=mutations())
def test_mutated_recipes_merge_or_fail_with_one_line(llama_family, mutation):
    recipe = mutate(valid_recipe(llama_family), mutation)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.yml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe, f)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main([path, os.path.join(tmp, "out")])
        lines = [line for line in err.getvalue().splitlines() if not line.startswith("seme: warning:")]
        if status == 0:
            assert os.path.isfile(os.path.join(tmp, "out", "model.safetensors.index.json"))
        else:
            assert status == 2, err.getvalue()
            assert len(lines) == 1 and lines[0].startswith("seme: error: "), err.getvalue()
            assert not os.path.exists(os.path.join(tmp, "out"))
