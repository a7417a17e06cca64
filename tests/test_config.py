"""Every validation failure: one line on stderr naming the problem, exit status 2, nothing written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import seme
from seme.merge import main


def write_recipe(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return str(path)


def run_cli(tmp_path, recipe, capsys, *extra):
    out = tmp_path / "out"
    status = main([write_recipe(tmp_path, recipe), str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return status, err, out


def ties(m, **overrides):
    recipe = {"merge_method": "ties", "base_model": m["base"],
              "models": [{"model": m["expert0"], "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": m["expert1"], "parameters": {"weight": 1.0, "density": 0.5}}]}
    recipe.update(overrides)
    return recipe


CASES = {
    "unknown top-level key": (lambda m: ties(m, merge_methd="x"), "unknown key 'merge_methd' (did you mean 'merge_method'?)"),
    "unknown method": (lambda m: ties(m, merge_method="tie"), "unknown merge_method 'tie' (did you mean 'ties'?)"),
    "missing method": (lambda m: {k: v for k, v in ties(m).items() if k != "merge_method"}, "missing required key 'merge_method'"),
    "missing weight": (lambda m: ties(m, models=[{"model": m["expert0"]}, {"model": m["expert1"]}]),
                       "needs parameter 'weight'"),
    "unknown parameter": (lambda m: ties(m, parameters={"densty": 0.5}), "unknown parameter 'densty' for method 'ties' (did you mean 'density'?)"),
    "parameter named by a number": (lambda m: ties(m, parameters={5: 0.5}), "unknown parameter '5' for method 'ties' (it takes:"),
    "missing model folder": (lambda m: ties(m, base_model="/nonexistent/model"), "model not found: no folder /nonexistent/model"),
    "model file": (lambda m: ties(m, base_model=os.path.join(m["base"], "model.safetensors")),
                   "model.safetensors is a file; a model is named by its folder ("),
    "missing model": (lambda m: ties(m, base_model="org/model"), "model not found: org/model is neither a local folder nor a model in the Hugging Face cache"),
    "blank model name": (lambda m: ties(m, base_model=" "), "base_model: model must be a path string, got ' '"),
    "models and slices": (lambda m: ties(m, slices=[]), "exactly one of 'models', 'slices' or 'modules'"),
    "empty models": (lambda m: ties(m, models=[]), "'models' must be a non-empty list"),
    "bad dtype": (lambda m: ties(m, dtype="float8"), "dtype must be one of"),
    "negative density": (lambda m: ties(m, parameters={"density": -0.5}), "parameter 'density' must be >= 0.0, got -0.5"),
    "density not a number": (lambda m: ties(m, parameters={"density": "half"}), "parameter 'density' must be a number"),
    "weight not finite": (lambda m: ties(m, parameters={"weight": float("nan")}), "parameter 'weight' must be a finite number, got nan"),
    "integer not finite": (lambda m: {"merge_method": "karcher", "parameters": {"max_iter": float("inf")}, "models": [
        {"model": m["expert0"]}, {"model": m["expert1"]}]}, "parameter 'max_iter' must be a finite number, got inf"),
    "layer range out of bounds": (lambda m: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 9]}]}]}, "layer_range [0, 9] is out of bounds for base (2 layers)"),
    "inverted layer range": (lambda m: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [2, 1]}]}]}, "must satisfy 0 <= start < end"),
    "slice lengths differ": (lambda m: {"merge_method": "linear", "slices": [{"sources": [
        {"model": m["base"], "layer_range": [0, 2]}, {"model": m["expert0"], "layer_range": [0, 1]}]}]},
        "must span the same number of layers"),
    "too many inputs": (lambda m: {"merge_method": "slerp", "base_model": m["base"], "parameters": {"t": 0.5},
                                   "models": [{"model": m["expert0"]}, {"model": m["expert1"]}]},
                        "takes at most 2 input models, got 3"),
    "base required": (lambda m: {"merge_method": "ties", "models": [{"model": m["expert0"], "parameters": {"weight": 1}}]},
                      "needs a base_model"),
    "weights sum to zero": (lambda m: {"merge_method": "linear", "models": [
        {"model": m["expert0"], "parameters": {"weight": 1.0}}, {"model": m["expert1"], "parameters": {"weight": -1.0}}]},
        "linear weights sum to 0"),
    "lrp weights sum to zero": (lambda m: {"merge_method": "lrp", "models": [
        {"model": m["expert0"], "parameters": {"weight": 0.5}}, {"model": m["expert1"], "parameters": {"weight": -0.5}}]},
        "lrp weights sum to 0, and it divides by their sum"),
    "multislerp weights sum to zero": (lambda m: {"merge_method": "multislerp", "models": [
        {"model": m["expert0"], "parameters": {"weight": 0.5}}, {"model": m["expert1"], "parameters": {"weight": -0.5}}]},
        "multislerp weights sum to 0, so they cannot be normalised"),
    "stabilize range past float32": (lambda m: {"merge_method": "seme", "base_model": m["base"], "parameters": {
        "stabilize": True, "stabilize_range": 1e39}, "models": [m["expert0"]]}, "parameter 'stabilize_range' must be <= 3.4e+38"),
    "filters match nothing": (lambda m: ties(m, models=[{"model": m["expert0"], "parameters": {
        "weight": [{"filter": "mlp", "value": 1.0}], "density": 0.5}}]), "parameter 'weight' has no value for expert0"),
    "bad regex filter": (lambda m: ties(m, parameters={"density": [{"filter": "re:(", "value": 0.5}]}),
                         "invalid regular expression"),
    "tokenizer token kind": (lambda m: ties(m, tokenizer={"tokens": {"<x>": {"source": {"kind": "mean"}}}}),
                             "tokens: '<x>': source kind must be 'zero' or 'model_token', got 'mean'"),
    "tokenizer token source": (lambda m: ties(m, tokenizer={"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": m["expert0"], "token_id": 3, "token": "w0"}}}}), "give token_id or token, one of them"),
    "tokenizer token not a string": (lambda m: ties(m, tokenizer={"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": m["expert0"], "token": 3}}}}), "source: token must be a string, got 3"),
    "tokenizer twice": (lambda m: ties(m, tokenizer_source="union", tokenizer={"source": "base"}),
                        "give tokenizer_source or tokenizer, not both"),
    "tokenizer key typo": (lambda m: ties(m, tokenizer={"sorce": "base"}), "config: tokenizer: unknown key 'sorce' (did you mean 'source'?)"),
    "tokenizer padding": (lambda m: ties(m, tokenizer={"pad_to_multiple_of": 0}), "pad_to_multiple_of must be a positive integer"),
    "tokenizer source null": (lambda m: ties(m, tokenizer={"source": None}),  # mergekit refuses it too
                              "tokenizer: source must be base, union or a model, got null"),
    "modules not a mapping": (lambda m: {"merge_method": "linear", "modules": [m["base"]]}, "'modules' must be a non-empty mapping"),
    "module parameter unknown": (lambda m: {"merge_method": "linear", "modules": {"default": {
        "models": [m["base"]], "parameters": {"wieght": 1.0}}}}, "modules.default.parameters: unknown parameter 'wieght'"),
    "random_seed type": (lambda m: ties(m, random_seed="abc"), "random_seed must be a non-negative integer"),
    "della epsilon": (lambda m: {"merge_method": "della", "base_model": m["base"], "parameters": {
        "weight": 1.0, "density": 0.1, "epsilon": 0.2}, "models": [{"model": m["expert0"]}]}, "DELLA needs 0 < density - epsilon"),
    "nested conditions": (lambda m: ties(m, parameters={"density": {"filter": "mlp", "value": [{"filter": "up", "value": 0.5}]}}),
                          "parameters.density: a condition's value must be a number or a list of numbers (gradient), not further"),
    "unknown key in a model": (lambda m: ties(m, models=[{"model": m["expert0"], "paramters": {}}]),
                               "models[0]: unknown key 'paramters' (did you mean 'parameters'?)"),
    # published recipes put parameters beside merge_method (allenai/open-instruct#463: `normalize: true`) or beside
    # a model, where mergekit ignores them: the line says where they go and what mergekit did
    "parameter beside merge_method": (lambda m: ties(m, int8_mask=True), "config: the parameter 'int8_mask' goes "
                                      "under 'parameters:' (mergekit ignores it here and merges with its default"),
    # examples/gradient-slerp.yml as mergekit's repository had it (commit 4643a47)
    "pattern for filter": (lambda m: ties(m, parameters={"weight": [{"pattern": "mlp", "value": 0.5}, {"value": 1.0}]}),
                           "parameters.weight[0]: 'pattern' is the old name of 'filter': write filter: mlp"),
    "parameter beside a model": (lambda m: ties(m, models=[{"model": m["expert0"], "weight": 0.5}]),
                                 "models[0]: the parameter 'weight' goes under 'parameters:'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_failure_is_one_line_and_exit_2(case, llama_family, tmp_path, capsys):
    make, expected = CASES[case]
    status, err, out = run_cli(tmp_path, make(llama_family), capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("seme: error: "), err
    assert expected in err[0]
    assert not out.exists() and not os.path.exists(f"{out}.seme-partial")


def test_yaml_syntax_error(tmp_path, capsys):
    status, err, _ = run_cli(tmp_path, "merge_method: ties\nmodels: [a, b\n", capsys)
    assert status == 2 and len(err) == 1 and "not valid YAML at line" in err[0]


@pytest.mark.parametrize("path", ["/no/such/recipe", "recipes/merge.yml"])
def test_a_missing_config_file_is_named(tmp_path, capsys, path):
    status = main([path, str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"seme: error: config file not found: {path}"]


def linear_of_two(tmp_path, a: dict, b: dict) -> dict:
    """A linear recipe over two tiny models built with the given options."""
    from conftest import build_model

    build_model(tmp_path / "a", **a)
    build_model(tmp_path / "b", **b)
    return {"merge_method": "linear", "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1}},
                                                 {"model": str(tmp_path / "b"), "parameters": {"weight": 1}}]}


def test_mismatched_shapes_are_found_from_headers(tmp_path, capsys):
    status, err, _ = run_cli(tmp_path, linear_of_two(tmp_path, {"vocab": 96}, {"vocab": 100}), capsys)
    assert status == 2 and len(err) == 1
    assert "tensor 'model.embed_tokens.weight' has different shapes: [96, 32] in a, [100, 32] in b" in err[0]
    assert "vocabularies differ" in err[0]


def test_a_tensor_float_in_one_model_and_integer_in_another_is_refused(tmp_path, capsys):
    # the first model's tensor was copied: the second's was dropped without a word
    import torch
    from safetensors.torch import load_file, save_file

    recipe = linear_of_two(tmp_path, {}, {})
    shard = tmp_path / "b" / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 3, dtype=torch.int64)
    save_file(tensors, shard, metadata={"format": "pt"})
    status, err, out = run_cli(tmp_path, recipe, capsys)
    assert status == 2 and len(err) == 1 and not out.exists()
    assert err[0] == ("seme: error: tensor 'model.norm.weight' is a float in some models and not in others "
                      "(F32 in a, I64 in b): it cannot be merged")


def test_different_depths_are_refused_not_truncated(tmp_path, capsys):
    status, err, _ = run_cli(tmp_path, linear_of_two(tmp_path, {"layers": 2}, {"layers": 3}), capsys)
    assert status == 2 and "models of different depths cannot be merged layer by layer (a: 2, b: 3)" in err[0]


@pytest.mark.parametrize("file, data, message", [
    ("pytorch_model.bin", b"\x80\x04not really a pickle", "pytorch_model.bin: not a PyTorch zip checkpoint (a legacy or foreign format)"),
    ("training_args.bin", b"", "no safetensors or pytorch_model.bin weights found (only training_args.bin, which is not pytorch_model.bin)"),
    # shards without their index, one missing: what is there would merge into a model without its tensors
    ("model-00002-of-00002.safetensors", b"", "shard model-00001-of-00002.safetensors is missing"),
    ("pytorch_model-00001-of-00003.bin", b"", "shard pytorch_model-00002-of-00003.bin is missing"),
    ("consolidated.safetensors", b"", "no safetensors or pytorch_model.bin weights found (only consolidated.safetensors: "
                                      "Mistral's own format, under mistral-inference's tensor names)"),
])
def test_models_without_readable_weights_are_refused(llama_family, tmp_path, capsys, file, data, message):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(llama_family["base"], "config.json")).read())
    (folder / file).write_bytes(data)
    recipe = {"merge_method": "linear", "models": [{"model": str(folder), "parameters": {"weight": 1}},
                                                   {"model": llama_family["base"], "parameters": {"weight": 1}}]}
    status, err, _ = run_cli(tmp_path, recipe, capsys)
    assert status == 2 and len(err) == 1 and message in err[0]


def _config_set(**changes):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return change


@pytest.mark.parametrize("change, message", [
    (lambda folder: (folder / "config.json").write_bytes(b"\xff\xfe{}"), "config.json: cannot read: 'utf-8' codec"),
    (lambda folder: (folder / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}"),
     "model.safetensors.index.json: malformed index ('utf-8' codec"),
    (_config_set(architectures={"LlamaForCausalLM": 1}), "architectures must be a list of class names, got {"),
    (_config_set(architectures=None, model_type=["llama"]), "model_type must be a string, got ['llama']"),
    (_config_set(num_hidden_layers=None), "the depth (num_hidden_layers) must be a non-negative integer, got None"),
    (_config_set(num_hidden_layers=float("nan")), "the depth (num_hidden_layers) must be a non-negative integer, got nan"),
    (_config_set(num_hidden_layers=2.5), "the depth (num_hidden_layers) must be a non-negative integer, got 2.5"),
])
def test_malformed_model_configs_are_one_line_errors(llama_family, tmp_path, capsys, change, message):
    folder = tmp_path / "model"
    shutil.copytree(llama_family["expert0"], folder)
    change(folder)
    recipe = {"merge_method": "linear", "models": [{"model": llama_family["base"], "parameters": {"weight": 1}},
                                                   {"model": str(folder), "parameters": {"weight": 1}}]}
    status, err, out = run_cli(tmp_path, recipe, capsys)
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert str(folder) in err[0], err  # which of the models is malformed
    assert not out.exists()


def test_non_empty_output_is_refused(llama_family, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys)
    assert status == 2 and "exists and is not empty (use --overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "mine"


def test_a_quantized_model_is_refused_before_any_merge(llama_family, tmp_path, capsys):
    # DeepSeek-V3's FP8 release, gpt-oss's MXFP4 one: packed weights beside scales, not mergeable numbers
    quantized = tmp_path / "fp8"
    shutil.copytree(llama_family["expert0"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (quantized / "config.json").write_text(json.dumps(config))
    recipe = ties({"base": llama_family["base"], "expert0": str(quantized), "expert1": llama_family["expert1"]})
    status, err, out = run_cli(tmp_path, recipe, capsys)
    assert status == 2 and len(err) == 1 and not out.exists()
    assert err[0] == (f"seme: error: {quantized}: its weights are quantized (fp8); seme merges unquantized weights: "
                      f"dequantize the model first (e.g. to bf16)")


def test_an_output_folder_that_is_or_holds_an_input_is_refused(llama_family, tmp_path, capsys):
    models = tmp_path / "models"
    for name in ("base", "expert0", "expert1"):
        shutil.copytree(llama_family[name], models / name)
    recipe = ties({k: str(models / k) for k in ("base", "expert0", "expert1")})
    path = write_recipe(tmp_path, recipe)
    for out in (models / "expert0", models, tmp_path):  # the model itself, its parent, the recipe's folder
        status = main([path, str(out), "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and "an input of the merge: choose another output folder" in err[0]
    assert sorted(os.listdir(models / "expert0")) == sorted(os.listdir(llama_family["expert0"]))
    assert os.path.isfile(path)


def test_overwrite_replaces_only_a_model_folder(llama_family, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old")
    status, err, _ = run_cli(tmp_path, ties(llama_family), capsys, "--overwrite")
    assert status == 2 and err == [f"seme: error: --overwrite replaces a model folder, and {out} also holds 'runs': "
                                   f"move it or choose another output folder"]
    assert (out / "model.safetensors").read_bytes() == b"old"
    (out / "runs").rmdir()
    (out / "notes.md").write_text("an earlier merge's card")
    status, err, _ = run_cli(tmp_path, ties(llama_family), capsys, "--overwrite")
    assert status == 0 and not (out / "notes.md").exists() and (out / "model.safetensors").stat().st_size > 3


def test_an_output_path_that_is_a_file_is_refused(llama_family, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys, "--overwrite")
    assert status == 2 and err == [f"seme: error: output path {out} is a file, not a folder"]
    assert out.read_text() == "mine"


def test_an_output_folder_that_cannot_be_created_is_refused(llama_family, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    status = main([write_recipe(tmp_path, ties(llama_family)), str(out)])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"seme: error: cannot create the output folder {out}: Not a directory ({out}.seme-partial)"]


def test_a_config_that_is_no_text_file(tmp_path, capsys):
    (tmp_path / "recipe.yml").write_bytes(b"\xff\xfe\x00merge")
    assert main([str(tmp_path / "recipe.yml"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"seme: error: config {tmp_path / 'recipe.yml'} is not UTF-8 text (a recipe is a YAML file)"]
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"seme: error: config {tmp_path} is a folder, not a recipe file"]


def test_hub_names_resolve_to_the_local_hub_cache(llama_family, tmp_path, capsys, monkeypatch):
    # mergekit recipes name hub models ("org/name", "org/name@revision"); the hub cache's layout is
    # models--org--name/{refs/<branch>, snapshots/<commit>/<file> -> ../../blobs/<hash>}.
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name in ("base", "expert0", "expert1"):
        repo = cache / f"models--org--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "blobs").mkdir()
        (repo / "snapshots" / commit).mkdir(parents=True)
        for f in os.listdir(llama_family[name]):
            shutil.copyfile(os.path.join(llama_family[name], f), repo / "blobs" / f)
            os.symlink(f"../../blobs/{f}", repo / "snapshots" / commit / f)
    local = ties(llama_family)
    status, _, out = run_cli(tmp_path, local, capsys)
    assert status == 0
    names = {"base": "org/base", "expert0": f"org/expert0@{commit}", "expert1": "org/expert1@main"}
    assert main([write_recipe(tmp_path, ties(names)), str(tmp_path / "from-hub")]) == 0
    assert (tmp_path / "from-hub" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    card = (tmp_path / "from-hub" / "README.md").read_text()  # a revision names an input, not a hub repository
    assert "\n- org/expert0\n" in card and f"- `org/expert0@{commit}`" in card
    capsys.readouterr()  # the plan names the models as the recipe does, not by their commit, which all three share
    assert main([write_recipe(tmp_path, ties(names)), str(tmp_path / "plan"), "--dry-run"]) == 0
    assert f"<- org/expert0@{commit}, org/expert1@main, org/base (base)  " in capsys.readouterr().out
    # a commit's short sha, as the Hub's pages show it; the cache as huggingface_hub reads it, ~ expanded
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", "~/hub")
    assert main([write_recipe(tmp_path, ties({**names, "base": "org/base@0123456"})), str(tmp_path / "short")]) == 0
    assert (tmp_path / "short" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    status, err, _ = run_cli(tmp_path, ties({**names, "base": "org/base@v2"}), capsys)
    assert status == 2 and err == [f"seme: error: base_model: model not found: the Hugging Face cache ({cache}) holds "
                                   f"org/base but not its revision v2 (it holds main, 0123456789ab); seme does not "
                                   f"download: fetch it first, e.g. `hf download org/base --revision v2`"]


def test_model_paths_may_start_with_a_tilde(llama_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", os.path.dirname(llama_family["base"]))
    tilde = {k: "~/" + os.path.basename(v) for k, v in llama_family.items() if k in ("base", "expert0", "expert1")}
    status, err, out = run_cli(tmp_path, ties(tilde), capsys)
    assert status == 0, err
    assert f"`{llama_family['base']}`" in (out / "README.md").read_text()  # the card names the folder


@pytest.mark.parametrize("flag, value", [("--out-shard-size", "lots"), ("--out-shard-size", "0"),
                                         ("--out-shard-size", "0.5"), ("--max-memory", "0.4")])
def test_bad_option_value(llama_family, tmp_path, capsys, flag, value):
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys, flag, value)
    assert status == 2 and err == [f"seme: error: invalid size '{value}' (expected e.g. 2GB, 500MB, 1.5GiB or a byte count)"]
    assert not out.exists()


@pytest.mark.parametrize("nbytes,text", [(0, "0 bytes"), (999, "999 bytes"), (110_592, "110.6 kB"), (12_345_678, "12.3 MB"),
                                          (1_500_000_000, "1.50 GB"), (3 * 10**12, "3.00 TB")])
def test_sizes_in_messages_read_back_as_options(nbytes, text):
    from seme.options import format_size, parse_size

    assert format_size(nbytes) == text
    if nbytes:  # a size of 0 is no option value
        assert abs(parse_size(text) - nbytes) <= 0.0051 * nbytes


@pytest.mark.parametrize("nbytes", [55_249, 4_264_900_001, 4_270_000_000, 999, 10**9])
def test_a_need_in_messages_reads_back_as_enough(nbytes):
    from seme.options import format_size, parse_size

    # "--max-memory X is below what ... needs: Y": Y given as --max-memory must be enough, so Y is rounded up
    assert nbytes <= parse_size(format_size(nbytes, up=True)) <= 1.01 * nbytes


def test_real_process_prints_no_traceback(tmp_path):
    path = write_recipe(tmp_path, {"merge_method": "tie", "models": []})
    proc = subprocess.run([sys.executable, "-m", "seme.merge", path, str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["seme: error: config: unknown merge_method 'tie' (did you mean 'ties'?) "
                                                "(known: " + proc.stderr.split("(known: ")[1].strip()]
    assert "Traceback" not in proc.stderr


def test_another_methods_parameters_are_ignored_as_in_mergekit(llama_family, tmp_path, capsys):
    # https://huggingface.co/YOYO-AI/Qwen2.5-14B-Fusion's recipe: arcee_fusion takes no parameters, and mergekit
    # ignores those copied from a ties recipe; a name no method takes stays refused (CASES: "unknown parameter")
    m = llama_family
    plain = {"merge_method": "arcee_fusion", "base_model": m["base"], "models": [{"model": m["expert0"]}]}
    # embed_slerp: mergekit's README names it, 0.1.5 reads it nowhere
    recipe = dict(plain, parameters={"normalize": True, "int8_mask": True, "rescale": False, "embed_slerp": True})
    status, err, out = run_cli(tmp_path, recipe, capsys)
    assert status == 0 and err[0] == ("seme: warning: parameters: arcee_fusion takes no 'embed_slerp', 'int8_mask', "
                                      "'normalize', 'rescale'; mergekit ignores them, and so does seme"), err
    assert main([write_recipe(tmp_path, plain), str(tmp_path / "plain")]) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_residual_weight_is_read_and_has_no_effect_as_in_mergekit(llama_family, tmp_path, capsys):
    recipe = {"merge_method": "linear", "slices": [{"sources": [
        {"model": llama_family["expert0"], "layer_range": [0, 2], "parameters": {"weight": 1.0}},
        {"model": llama_family["expert1"], "layer_range": [0, 2], "parameters": {"weight": 1.0}}], "residual_weight": 0.5}]}
    status, err, out = run_cli(tmp_path, recipe, capsys)
    assert status == 0 and "seme: warning: slices[0]: residual_weight has no effect" in "\n".join(err)
    plain = dict(recipe, slices=[{k: v for k, v in recipe["slices"][0].items() if k != "residual_weight"}])
    assert main([write_recipe(tmp_path, plain), str(tmp_path / "plain")]) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_mergekit_yaml_flags_are_accepted_with_their_meaning(llama_family, tmp_path, capsys, monkeypatch):
    """A mergekit-yaml command line works with the command changed: flags without an effect here
    are accepted, --quiet and -j are applied, and the output is the plain run's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    status, err, plain = run_cli(tmp_path, ties(llama_family), capsys)
    assert status == 0, err
    shutil.move(str(plain), str(tmp_path / "plain"))
    flags = ["--allow-crimes", "--lazy-unpickle", "--no-low-cpu-memory", "--copy-tokenizer", "--safe-serialization",
             "--trust-remote-code", "--async-write", "--write-threads", "2", "--clone-tensors", "--quiet", "-j", "2",
             "--out-shard-size", "5B", "--lora-merge-cache", str(tmp_path / "cache"), "-v", "--no-multi-gpu"]
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys, *flags)
    assert status == 0, err
    assert os.environ["OMP_NUM_THREADS"] == "2"
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "plain"))
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--no-safe-serialization"], "seme writes safetensors only"),
    (["--unsafe-truncate-embeddings"], "--unsafe-truncate-embeddings is not supported: give the models one "
                                       "vocabulary with tokenizer_source"),
    (["--random-seed", "-3"], "invalid random seed '-3'"),
    (["--num-threads", "0"], "--num-threads must be at least 1, got 0"),
    (["-j", "-2"], "--num-threads must be at least 1, got -2"),
])
def test_mergekit_yaml_flags_seme_refuses_are_one_line_errors(llama_family, tmp_path, capsys, flags, message):
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys, *flags)
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_cuda_flag_asks_for_a_gpu(llama_family, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --cuda merges on it (tests/test_gpu_merge.py)")
    status, err, _ = run_cli(tmp_path, ties(llama_family), capsys, "--cuda")
    assert status == 2 and err == ["seme: error: --device cuda was asked for, but torch sees no CUDA device"]


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda:3", 1, "--device cuda:3 was asked for, but torch sees 1 CUDA device, cuda:0"),
    ("cuda:2", 2, "--device cuda:2 was asked for, but torch sees 2 CUDA devices, cuda:0 to cuda:1"),
    ("cuda:255", 1, "invalid device 'cuda:255' (expected cpu, cuda or cuda:N, N up to 127)"),  # torch: cuda
    ("cuda:99999999999", 1, "invalid device 'cuda:99999999999' (expected cpu, cuda or cuda:N, N up to 127)"),
])
def test_a_cuda_device_torch_does_not_see_is_refused(llama_family, tmp_path, capsys, monkeypatch, device, gpus,
                                                     message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys, "--device", device)
    assert status == 2 and err == [f"seme: error: {message}"]
    assert not out.exists()
    status, err, _ = run_cli(tmp_path, ties(llama_family), capsys, "--device", device, "--dry-run")
    assert status == (2 if "invalid" in message else 0), err  # a plan for another machine's GPU, unless torch cannot name it


def test_no_copy_tokenizer_and_no_model_card(llama_family, tmp_path, capsys):
    status, err, out = run_cli(tmp_path, ties(llama_family), capsys, "--no-copy-tokenizer", "--no-write-model-card")
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "model.safetensors.index.json"]
    # a tokenizer the recipe chooses is written all the same; a chat template needs one
    status, err, out = run_cli(tmp_path, ties(llama_family, tokenizer_source="base"), capsys, "--no-copy-tokenizer",
                               "--overwrite")
    assert status == 0 and (out / "tokenizer.json").is_file(), err
    status, err, _ = run_cli(tmp_path, ties(llama_family, chat_template="chatml"), capsys, "--no-copy-tokenizer",
                             "--overwrite")
    assert status == 2 and err == ["seme: error: config: chat_template goes into the tokenizer files, which "
                                   "--no-copy-tokenizer leaves out"]


@pytest.mark.parametrize("style", ["block", "flow", "with a seed"])
def test_random_seed_flag_replaces_the_recipes(llama_family, tmp_path, capsys, style):
    dare = {"merge_method": "dare_ties", "base_model": llama_family["base"], "dtype": "float32",
            "models": [{"model": llama_family["expert0"], "parameters": {"weight": 1.0, "density": 0.5}}]}
    seeded = tmp_path / "seeded"
    assert main([write_recipe(tmp_path, {**dare, "random_seed": 5}), str(seeded)]) == 0
    given = {**dare, "random_seed": 0} if style == "with a seed" else dare
    text = yaml.safe_dump(given, default_flow_style=True) if style == "flow" else yaml.safe_dump(given)
    status, err, out = run_cli(tmp_path, text, capsys, "--random-seed", "5")
    assert status == 0, err
    assert (out / "model.safetensors").read_bytes() == (seeded / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe == {**dare, "random_seed": 5}  # the card's recipe reproduces the merge
    status, err, unseeded = run_cli(tmp_path, dare, capsys, "--overwrite")
    assert (unseeded / "model.safetensors").read_bytes() != (seeded / "model.safetensors").read_bytes()


def test_a_recipe_and_outputs_named_from_the_home_folder_are_there(llama_family, tmp_path, monkeypatch):
    """~ where no shell expands it (quoted, --out-path=~/x, the Python API) is the home folder, as in the
    recipe's model paths, not a folder named ~ in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "home" / "recipes")
    (tmp_path / "home" / "recipes" / "r.yml").write_text(yaml.safe_dump(ties(llama_family)))
    assert main(["~/recipes/r.yml", "--out-path=~/merged"]) == 0
    stages = f"name: first\n{yaml.safe_dump(ties(llama_family))}---\n{yaml.safe_dump(ties(llama_family, base_model='first'))}"
    seme.merge(stages, "~/final", intermediate_dir="~/stages", progress=False)
    assert sorted(os.listdir(tmp_path / "home")) == ["final", "merged", "recipes", "stages"]
    assert os.listdir(tmp_path) == ["home"]


def test_transformers_cache_flag_names_the_hub_cache(llama_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    names = {}
    for name in ("base", "expert0", "expert1"):
        repo = cache / f"models--org--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(llama_family[name], repo / "snapshots" / commit)
        names[name] = f"org/{name}"
    status, err, out = run_cli(tmp_path, ties(names), capsys, "--transformers-cache", str(cache))
    assert status == 0, err
    card = (out / "README.md").read_text()  # models as the recipe names them, and the hub's model tree
    assert card.startswith("---\nbase_model:\n- org/expert0\n- org/expert1\n- org/base\nlibrary_name:")
    assert "- `org/base`" in card and str(cache) not in card


def test_an_output_path_that_is_a_link_is_merged_into_the_folder_it_names(llama_family, tmp_path, capsys):
    # The link stays and names the output; renaming the finished merge onto the link failed after the
    # whole merge ('Cannot call rmtree on a symbolic link', 'Not a directory' for a dangling link).
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere")
    recipe = write_recipe(tmp_path, ties(llama_family))
    for link, folder in [("link", "real"), ("dangling", "elsewhere")]:
        assert main([recipe, str(tmp_path / link)]) == 0, capsys.readouterr().err
        assert (tmp_path / link).is_symlink() and (tmp_path / folder / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["dangling", "elsewhere", "link", "real", "recipe.yml"]


def test_an_output_folder_that_is_a_mount_point_is_refused(llama_family, tmp_path, capsys, monkeypatch):
    # The merge is built beside its output and renamed into place, which a mount point refuses (EBUSY):
    # the whole merge ran first (and with --overwrite, the mount's files were deleted before the failure).
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("previous")
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == str(out))
    status, err, _ = run_cli(tmp_path, ties(llama_family), capsys, "--overwrite")
    assert status == 2 and len(err) == 1 and f"output folder {out} is a mount point" in err[0], err
    assert (out / "model.safetensors").read_text() == "previous" and not os.path.exists(f"{out}.seme-partial")
