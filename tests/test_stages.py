"""Multi-stage recipes (mergekit-multimerge's format): several YAML documents, named stages merged
into an intermediate folder and used as models by the later ones, one final merge into OUT."""
from __future__ import annotations

import os

import pytest
import yaml

import seme
from conftest import load_folder
from seme.merge import main


def stage_recipes(m):
    first = {"name": "first", "merge_method": "ties", "base_model": m["base"], "dtype": "float32",
             "models": [{"model": m[f"expert{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)]}
    final = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": "first", "parameters": {"weight": 0.7}},
                        {"model": m["expert2"], "parameters": {"weight": 0.3}}]}
    return first, final


def write(tmp_path, *docs) -> str:
    path = tmp_path / "stages.yml"
    path.write_text("---\n".join(d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False) for d in docs))
    return str(path)


def run(path, out, capsys, *extra):
    status = main([path, str(out), *extra])
    return status, [line for line in capsys.readouterr().err.splitlines() if not line.startswith("seme: warning")]


def test_stages_merge_in_the_order_their_uses_need(llama_family, tmp_path, capsys):
    first, final = stage_recipes(llama_family)
    path = write(tmp_path, final, first)  # the final merge first in the file
    status, err = run(path, tmp_path / "out", capsys)
    assert status == 0, err
    assert [line for line in err if line.startswith("seme: stage")] == [
        f"seme: stage first -> {tmp_path}/out.stages/first", f"seme: stage final -> {tmp_path}/out"]
    # the same as the two recipes merged by hand, one after the other
    seme.merge({k: v for k, v in first.items() if k != "name"}, str(tmp_path / "by-hand-first"), progress=False)
    final_by_hand = {**final, "models": [{"model": str(tmp_path / "by-hand-first"), "parameters": {"weight": 0.7}},
                                         final["models"][1]]}
    seme.merge(final_by_hand, str(tmp_path / "by-hand"), progress=False)
    assert load_folder(tmp_path / "out").keys() == load_folder(tmp_path / "by-hand").keys()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "by-hand" / "model.safetensors").read_bytes()
    assert "name: first" in (tmp_path / "out.stages" / "first" / "README.md").read_text()


def test_a_stage_merged_from_the_same_recipe_is_kept(llama_family, tmp_path, capsys):
    first, final = stage_recipes(llama_family)
    path = write(tmp_path, first, final)
    stage = tmp_path / "stages" / "first"
    assert run(path, tmp_path / "out", capsys, "-I", str(tmp_path / "stages"))[0] == 0
    written = os.stat(stage / "model.safetensors").st_mtime_ns
    status, err = run(path, tmp_path / "out", capsys, "-I", str(tmp_path / "stages"), "--overwrite")
    assert status == 0 and f"seme: stage first: kept {stage}, merged from this recipe before" in err
    assert os.stat(stage / "model.safetensors").st_mtime_ns == written
    # --no-lazy merges it again; so does a change of its recipe, and the final stage follows
    status, err = run(path, tmp_path / "out", capsys, "-I", str(tmp_path / "stages"), "--overwrite", "--no-lazy")
    assert status == 0 and f"seme: stage first -> {stage}" in err
    for _ in range(2):  # a seed given on the command line is the recipe's: the second run keeps the stage
        status, err = run(path, tmp_path / "out", capsys, "-I", str(tmp_path / "stages"), "--overwrite",
                          "--random-seed", "7")
    assert status == 0 and f"seme: stage first: kept {stage}, merged from this recipe before" in err
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    path = write(tmp_path, {**first, "models": first["models"][:1]}, final)
    status, err = run(path, tmp_path / "out", capsys, "-I", str(tmp_path / "stages"), "--overwrite")
    assert status == 0 and f"seme: stage first -> {stage}" in err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != before


def test_when_every_stage_is_named_the_one_no_other_uses_is_final(llama_family, tmp_path, capsys):
    first, final = stage_recipes(llama_family)
    status, err = run(write(tmp_path, first, {**final, "name": "last"}), tmp_path / "out", capsys)
    assert status == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out.stages" / "last").exists()


@pytest.mark.parametrize("case, message", [
    ("cycle", "config: the stages first, second use each other's outputs in a cycle"),
    ("two unnamed", "config: 2 recipes have no name; in a multi-stage recipe only the final one may go without"),
    ("same name", "config: two recipes are named 'first'"),
    ("two finals", "config: the stages first, other are used by no other stage"),
    ("bad stage", "stage first: config: unknown merge_method 'tie' (did you mean 'ties'?)"),
    ("not a mapping", "config: recipe 2 of 2 must be a mapping, got list"),
    ("bad name", "config: recipe 1: name must be a folder name, got 'a/b'"),
    ("name with a NUL", "config: recipe 1: name must be a folder name, got 'a\\x00'"),
    ("output exists", "output folder"),
])
def test_what_a_multi_stage_recipe_cannot_do_is_a_one_line_error(llama_family, tmp_path, capsys, case, message):
    first, final = stage_recipes(llama_family)
    docs = {
        "cycle": [{**first, "models": [{"model": "second", "parameters": {"weight": 1.0, "density": 0.5}}]},
                  {**final, "name": "second", "models": [{"model": "first"}], "parameters": {"weight": 1.0}},
                  {**final, "models": [{"model": "second"}], "parameters": {"weight": 1.0}}],
        "two unnamed": [final, final],
        "same name": [first, first, final],
        "two finals": [first, {**first, "name": "other"}],
        "bad stage": [{**first, "merge_method": "tie"}, final],
        "not a mapping": [first, "[1, 2]\n"],
        "bad name": [{**first, "name": "a/b"}, final],
        "name with a NUL": [{**first, "name": "a\0"}, final],
        "output exists": [first, final],
    }[case]
    if case == "output exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    status, err = run(write(tmp_path, *docs), tmp_path / "out", capsys)
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.stages").exists()  # refused before any stage ran


def test_loading_a_multi_stage_recipe_as_one_says_what_it_is(llama_family, tmp_path):
    from seme import config
    from seme.errors import SemeError

    with pytest.raises(SemeError, match="config holds 2 recipes \\(a multi-stage recipe"):
        config.load(write(tmp_path, *stage_recipes(llama_family)))


def test_mergekit_multimerge_command_line_works_with_the_command_changed(llama_family, tmp_path, capsys):
    # mergekit-multimerge CONFIG --intermediate-dir DIR --out-path OUT
    path = write(tmp_path, *stage_recipes(llama_family))
    status = main([path, "--intermediate-dir", str(tmp_path / "stages"), "--out-path", str(tmp_path / "out")])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "stages" / "first").is_dir()
    assert main([path, str(tmp_path / "a"), "--out-path", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"two outputs given: {tmp_path}/a and --out-path {tmp_path}/b")


def test_empty_documents_are_no_stages(llama_family, tmp_path, capsys):
    first, final = stage_recipes(llama_family)
    final = {**final, "models": [{"model": llama_family["expert0"], "parameters": {"weight": 1.0}}]}
    path = tmp_path / "one.yml"
    path.write_text("---\n" + yaml.safe_dump(final) + "---\n")  # a closing --- opens an empty document
    status, err = run(str(path), tmp_path / "out", capsys)
    assert status == 0 and not any(line.startswith("seme: stage") for line in err), err
    path.write_text("---\n---\n")
    status, err = run(str(path), tmp_path / "none", capsys)
    assert status == 2 and err == ["seme: error: config is empty"]
