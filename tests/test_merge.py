"""Whole merges: the output reloads in transformers and generates; layout, metadata and options."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import seme
from conftest import build_family, build_model, load_folder
from seme.errors import SemeError
from seme.options import parse_size


def reload_and_generate(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 5, 7, 9]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 5)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_merged_model_reloads_and_generates(tied, tmp_path):
    models = build_family(str(tmp_path), "llama", n_experts=2, tied=tied)
    recipe = {"merge_method": "ties", "base_model": models["base"], "out_dtype": "bfloat16",
              "parameters": {"weight": 1.0, "density": 0.5},
              "models": [{"model": models["expert0"]}, {"model": models["expert1"]}]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    tensors = load_folder(tmp_path / "out")
    assert ("lm_head.weight" in tensors) == (not tied)  # tied heads stay tied, never duplicated
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied and config["dtype"] == "bfloat16"
    model = reload_and_generate(tmp_path / "out")
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_output_takes_the_head_of_a_tied_input(tmp_path):
    base = build_model(tmp_path / "untied", tied=False)
    build_model(tmp_path / "tied", tied=True, base_state=base)
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / "untied"), "parameters": {"weight": 1.0}},
                                                   {"model": str(tmp_path / "tied"), "parameters": {"weight": 1.0}}]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    out, tied = load_folder(tmp_path / "out"), load_folder(tmp_path / "tied")
    expected = (base["lm_head.weight"] + tied["model.embed_tokens.weight"]) / 2
    torch.testing.assert_close(out["lm_head.weight"], expected)


def test_sharded_output_and_sharded_input(llama_family, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": llama_family["base"],
              "parameters": {"weight": 0.5}, "models": [{"model": llama_family["expert0"]}]}
    seme.merge(recipe, str(tmp_path / "sharded"), out_shard_size="20KB", progress=False)
    files = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert all(os.path.getsize(tmp_path / "sharded" / f) < 20_000 + 4096 or
               len([k for k, v in index["weight_map"].items() if v == f]) == 1 for f in files)
    reload_and_generate(tmp_path / "sharded")
    # A sharded model is a valid input: merging it with itself reproduces it.
    again = {"merge_method": "linear", "models": [{"model": str(tmp_path / "sharded"), "parameters": {"weight": 1.0}},
                                                  {"model": str(tmp_path / "sharded"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(seme.errors.SemeError, match="listed twice"):
        seme.merge(again, str(tmp_path / "twice"))
    single = {"merge_method": "passthrough", "models": [{"model": str(tmp_path / "sharded")}]}
    seme.merge(single, str(tmp_path / "copy"), progress=False)
    a, b = load_folder(tmp_path / "sharded"), load_folder(tmp_path / "copy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metadata_tokenizer_and_model_card(llama_family, tmp_path):
    recipe_path = tmp_path / "recipe.yml"
    recipe = {"merge_method": "sce", "base_model": llama_family["base"], "tokenizer_source": llama_family["expert1"],
              "models": [{"model": llama_family["expert0"]}, {"model": llama_family["expert1"]}]}
    recipe_path.write_text(yaml.safe_dump(recipe))
    seme.merge(str(recipe_path), str(tmp_path / "out"), progress=False)
    out = tmp_path / "out"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "README.md"):
        assert (out / f).is_file(), f
    assert (out / "tokenizer.json").read_bytes() == open(os.path.join(llama_family["expert1"], "tokenizer.json"), "rb").read()
    card = (out / "README.md").read_text()
    assert f"seme {seme.__version__}" in card and "merge_method: sce" in card and llama_family["expert0"] in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == recipe  # as mergekit writes it beside its card
    assert not os.path.exists(f"{out}.seme-partial")


def _retokenized(src, dst, edit):
    """A copy of model `src` whose tokenizer.json is rewritten by edit(data)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    edit(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)  # other bytes even where the vocabulary is the same
    return str(dst)


def test_tokenizer_source_outside_the_merge_and_vocabularies_that_agree(llama_family, tmp_path):
    # a model the merge does not read can lend its tokenizer; one with the same vocabulary written
    # differently is accepted (mergekit's re-mapping of rows would be the identity)
    same = _retokenized(llama_family["expert1"], tmp_path / "same", lambda data: data.update(truncation=None))
    for i, source in enumerate([llama_family["expert2"], same, "base"]):
        recipe = {"merge_method": "linear", "tokenizer_source": source,
                  "models": [{"model": llama_family["expert0"], "parameters": {"weight": 1.0}},
                             {"model": same, "parameters": {"weight": 1.0}}]}
        seme.merge(recipe, str(tmp_path / f"out{i}"), progress=False)
    assert (tmp_path / "out0" / "tokenizer.json").read_bytes() == \
        open(os.path.join(llama_family["expert2"], "tokenizer.json"), "rb").read()


def test_passthrough_slices_change_depth_and_per_layer_config(qwen2_family, tmp_path):
    m = qwen2_family
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["expert0"], "layer_range": [1, 2]}]}]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and len(config["layer_types"]) == 3
    out, expert = load_folder(tmp_path / "out"), load_folder(m["expert0"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], expert["model.layers.1.mlp.up_proj.weight"])
    reload_and_generate(tmp_path / "out")


def test_slices_keep_layers_of_each_kind_where_an_index_rule_of_the_config_puts_them(tmp_path):
    """GLM-4.5's layers below first_k_dense_replace have a dense MLP, the others experts, by index: an upscaling that
    keeps the dense layer first and repeats expert layers reloads with every tensor in use; slices that move the
    dense layer among expert layers (or an expert layer into its place) are refused in one line before any
    tensor is read, rather than written as a model that loads with missing and unused tensors."""
    import transformers

    from test_architectures import build

    build("glm4_moe", {"num_hidden_layers": 3}).save_pretrained(tmp_path / "a")
    a = str(tmp_path / "a")

    def passthrough(*ranges):
        return {"merge_method": "passthrough", "dtype": "float32",
                "slices": [{"sources": [{"model": a, "layer_range": list(r)}]} for r in ranges]}

    seme.merge(passthrough((0, 3), (1, 3)), str(tmp_path / "up"), progress=False)
    assert json.loads((tmp_path / "up" / "config.json").read_text())["num_hidden_layers"] == 5
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "up", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reload_and_generate(tmp_path / "up")
    for ranges, moved in ((((1, 3), (0, 1)), "layer 1 of a at layer 0"), (((0, 1), (0, 3)), "layer 0 of a at layer 1")):
        with pytest.raises(SemeError, match=f"slices put {moved}, where the output's config has a layer of another "
                                            f"kind \\(their tensors differ: model.layers.N.mlp."):
            seme.merge(passthrough(*ranges), str(tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists()


def test_a_depth_given_as_the_list_of_layer_kinds_follows_the_layers(tmp_path):
    # nemotron_h configs written by transformers 5 have no num_hidden_layers: layers_block_type is the depth
    from test_architectures import build

    build("nemotron_h", {}).save_pretrained(tmp_path / "a")  # a Mamba layer, then an attention
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 1]}]}]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "num_hidden_layers" not in config
    assert config["layers_block_type"] == ["linear_attention", "full_attention", "linear_attention"]
    out = load_folder(tmp_path / "out")
    assert torch.equal(out["backbone.layers.2.mixer.in_proj.weight"], out["backbone.layers.0.mixer.in_proj.weight"])
    reload_and_generate(tmp_path / "out")
    seme.merge({"merge_method": "linear", "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]},
               str(tmp_path / "same"), progress=False)
    assert json.loads((tmp_path / "same" / "config.json").read_text())["layers_block_type"] == \
        ["linear_attention", "full_attention"]

    # Older configs: a layer count and a pattern of a character per layer, which transformers prefers
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["layers_block_type"]
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2,
                                                            "hybrid_override_pattern": "M*"}))
    seme.merge(recipe, str(tmp_path / "older"), progress=False)
    config = json.loads((tmp_path / "older" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["hybrid_override_pattern"] == "M*M"
    reload_and_generate(tmp_path / "older")


def test_tables_packing_a_block_per_layer_keep_their_layers_in_place(tmp_path, capsys):
    # Gemma 4 E2B / E4B: embed_tokens_per_layer and per_layer_model_projection hold one block per layer
    from test_architectures import build

    from seme.merge import main

    build("gemma4", {"hidden_size_per_layer_input": 8}).save_pretrained(tmp_path / "a")
    a = str(tmp_path / "a")
    seme.merge({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 1]}]}, {"sources": [{"model": a, "layer_range": [1, 2]}]}]},
        str(tmp_path / "in-place"), progress=False)  # every layer where it was
    reload_and_generate(tmp_path / "in-place")
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": a, "layer_range": [1, 2]}]}]}))
    capsys.readouterr()
    assert main([str(tmp_path / "r.yml"), str(tmp_path / "deeper")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["seme: error: model.embed_tokens_per_layer.weight packs a block for each of its 2 layers: slices "
                   "that move or drop layers would leave it with the old layers' blocks; keep every layer in place"], err
    assert not (tmp_path / "deeper").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(llama_family, tmp_path, capsys):
    recipe = {"merge_method": "ties", "base_model": llama_family["base"],
              "models": [{"model": llama_family["expert0"], "parameters": {"weight": [1.0, 0.0], "density": 0.5}}]}
    stats = seme.merge(recipe, str(tmp_path / "out"), dry_run=True)
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert f"output: {stats['tensors']} tensors" in text
    line0 = next(line for line in text.splitlines() if line.startswith("model.layers.0.mlp.up_proj.weight"))
    line1 = next(line for line in text.splitlines() if line.startswith("model.layers.1.mlp.up_proj.weight"))
    assert "weight=[1]" in line0 and "weight=[0]" in line1 and "density=[0.5]" in line0
    assert "<- expert0, base (base)" in line0
    # the memory the largest tensor's merge needs, as --max-memory takes it (not "N B", which reads as N billion)
    shown = next(line for line in text.splitlines() if line.startswith("memory: ")).removeprefix("memory: ").split(" (")[0]
    need = parse_size(shown)
    assert shown == f"{need} bytes"
    seme.merge(recipe, str(tmp_path / "out"), max_memory=shown, progress=False)
    with pytest.raises(SemeError, match="below what the largest tensor needs"):
        seme.merge(recipe, str(tmp_path / "short"), max_memory=need - 1, progress=False)


def test_a_dry_run_piped_into_a_reader_that_leaves_ends_quietly(llama_family, tmp_path):
    recipe = tmp_path / "r.yml"  # as `--dry-run | head` does: the reader closes the pipe before the plan is out
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": llama_family["base"],
                                                                             "parameters": {"weight": 1.0}}]}))
    proc = subprocess.Popen([sys.executable, "-m", "seme.merge", str(recipe), str(tmp_path / "out"), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == ""


def test_filters_substring_regex_and_glob(llama_family, tmp_path, capsys):
    m = llama_family
    weight = [{"filter": "re:layers\\.1\\..*mlp", "value": 0.25}, {"filter": "glob:*.self_attn.q_proj.*", "value": 0.5},
              {"filter": "mlp", "value": 0.75}, {"value": 1.0}]
    recipe = {"merge_method": "task_arithmetic", "base_model": m["base"],
              "models": [{"model": m["expert0"], "parameters": {"weight": weight}}]}
    seme.merge(recipe, "unused", dry_run=True)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("model.")}
    assert "weight=[0.25]" in lines["model.layers.1.mlp.up_proj.weight"]
    assert "weight=[0.75]" in lines["model.layers.0.mlp.up_proj.weight"]
    assert "weight=[0.5]" in lines["model.layers.1.self_attn.q_proj.weight"]
    assert "weight=[1]" in lines["model.layers.1.self_attn.k_proj.weight"]


def test_help_imports_nothing_heavy():
    code = ("import sys, contextlib, io\nfrom seme.merge import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'yaml') if m in sys.modules]\n"
            "assert not heavy, heavy\nimport seme\nassert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_installed_command_is_the_module_command(tmp_path):
    """`seme-merge` (pyproject's console script) names itself in usage and errors, and exits as
    `python -m seme.merge` does: status 2 and one line for a bad input."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")) as f:
        entry = next(line.split("=", 1)[1].strip().strip('"') for line in f if line.startswith("seme-merge"))
    module, function = entry.split(":")
    script = f"import sys; sys.argv[0] = 'seme-merge'; from {module} import {function}; {function}()"
    usage = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: seme-merge ")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "missing.yml"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("seme: error: ") and not (tmp_path / "out").exists()


def test_demo_runs(llama_family, tmp_path):
    def demo(folder):
        return subprocess.run([sys.executable, "-m", "seme.merge", "--demo", str(folder)],
                              capture_output=True, text=True, timeout=300)

    proc = demo(tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert "reloads (torch.bfloat16) and generates" in proc.stderr
    assert (tmp_path / "demo" / "model.safetensors").is_file()
    assert demo(tmp_path / "demo").returncode == 0  # its own earlier output is rebuilt
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    proc = demo(tmp_path / "mine")  # any other non-empty folder is refused, before models are built
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"seme: error: output folder {tmp_path / 'mine'} exists and is not empty (use --overwrite to replace it)"]
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    merged = tmp_path / "merged"  # another recipe's merge: refused too, not taken for the demo's output
    seme.merge({"merge_method": "linear", "models": [{"model": llama_family["base"], "parameters": {"weight": 1.0}}]},
               str(merged), progress=False)
    before = {f: (merged / f).read_bytes() for f in os.listdir(merged)}
    proc = demo(merged)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert {f: (merged / f).read_bytes() for f in os.listdir(merged)} == before
    proc = subprocess.run([sys.executable, "-m", "seme.merge", "--demo", str(tmp_path / "bad"), "--backend", "fast"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [  # a bad option too, before the building
        "seme: error: invalid backend 'fast' (expected auto, fused or reference)"]


@pytest.mark.parametrize("fits", [True, False])
def test_inputs_larger_than_memory_leave_the_page_cache_after_their_last_use(qwen2_family, tmp_path, monkeypatch,
                                                                           fits):
    from seme import executor
    from seme.io import safetensors_file

    m = qwen2_family  # base's layer 1 feeds two output layers: it is evicted after the second
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["base"], "layer_range": [1, 2]}]}]}
    seme.merge(recipe, str(tmp_path / "cached"), progress=False)
    evicted, original = [], os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        evicted.append((os.readlink(f"/proc/self/fd/{fd}"), offset, advice))
        original(fd, offset, length, advice)

    monkeypatch.setattr(safetensors_file.os, "posix_fadvise", fadvise)
    monkeypatch.setattr(executor, "available_memory", lambda: 10**12 if fits else 0)
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    assert load_folder(tmp_path / "out").keys() == load_folder(tmp_path / "cached").keys()
    for name, tensor in load_folder(tmp_path / "out").items():
        assert torch.equal(tensor, load_folder(tmp_path / "cached")[name]), name
    if fits:
        assert not evicted
        return
    from seme.io.model import ModelFolder

    base = ModelFolder.open(m["base"])
    # every input tensor of at least a page, once, as dropped pages: layer 1's too, though read twice
    wide = {(os.path.realpath(i.path), -(-i.start // 4096) * 4096) for i in base.tensors.values()
            if (i.end - i.end % 4096) > -(-i.start // 4096) * 4096}
    assert sorted(evicted) == sorted((path, start, os.POSIX_FADV_DONTNEED) for path, start in wide)


def with_mtp_layer(path: str, seed: int) -> None:
    """Add a multi-token-prediction layer after the last, as DeepSeek-V3's checkpoints store it
    (transformers does not load it): a copy of the last layer plus its own norms, projection and head."""
    from safetensors.torch import load_file, save_file

    weights = f"{path}/model.safetensors"
    state = load_file(weights)
    depth = json.loads(open(f"{path}/config.json").read())["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    for name in [n for n in state if n.startswith(f"model.layers.{depth - 1}.")]:
        state[name.replace(f".{depth - 1}.", f".{depth}.", 1)] = state[name] + 0.01 * torch.randn(
            state[name].shape, generator=g)
    hidden = state["model.norm.weight"].numel()
    mtp = f"model.layers.{depth}."
    state[mtp + "enorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state[mtp + "hnorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state[mtp + "eh_proj.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=g)
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"] + 0.01
    state[mtp + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"] + 0.01 * torch.randn(
        state["lm_head.weight"].shape, generator=g)
    save_file(state, weights, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def deepseek_mtp(tmp_path_factory):
    """base + 2 experts of a tiny DeepSeek-V3 (one dense, one MoE layer), each with its MTP layer."""
    return family_with(tmp_path_factory, "deepseek_v3", with_mtp_layer)


def family_with(tmp_path_factory, family: str, add) -> dict:
    """base + 2 experts of a tiny `family`, each given add(path, seed)."""
    models = build_family(str(tmp_path_factory.mktemp("models")), family, n_experts=2)
    for i, path in enumerate(models.values()):
        add(path, seed=i)
    return models


def quarter_and_three_quarters(m: dict) -> dict:
    """A linear recipe: a quarter of expert0, three quarters of expert1."""
    return {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": m["expert0"], "parameters": {"weight": 0.25}}, {"model": m["expert1"], "parameters": {"weight": 0.75}}]}


def last_layer_twice(m: dict) -> dict:
    """A passthrough recipe three layers deep: expert0's two, then expert1's last."""
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": m["expert0"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["expert1"], "layer_range": [1, 2]}]}]}


def test_layers_after_the_last_are_merged_after_the_output_s_last(deepseek_mtp, tmp_path):
    m = deepseek_mtp
    seme.merge(quarter_and_three_quarters(m), str(tmp_path / "whole"), progress=False)
    e0, e1, ours = load_folder(m["expert0"]), load_folder(m["expert1"]), load_folder(tmp_path / "whole")
    assert sorted(ours) == sorted(e0)
    for name in (n for n in e0 if n.startswith("model.layers.2.")):
        torch.testing.assert_close(ours[name], 0.25 * e0[name] + 0.75 * e1[name], msg=name)

    # A deeper output (layer 1 twice): the MTP layer follows its last layer, from the last slice.
    seme.merge(last_layer_twice(m), str(tmp_path / "deeper"), progress=False)
    deeper = load_folder(tmp_path / "deeper")
    assert json.loads((tmp_path / "deeper" / "config.json").read_text())["num_hidden_layers"] == 3
    assert not any(n.startswith("model.layers.4.") for n in deeper)
    for name in (n for n in e1 if n.startswith("model.layers.2.")):
        torch.testing.assert_close(deeper[name.replace(".2.", ".3.", 1)], e1[name], msg=name)
    reload_and_generate(tmp_path / "deeper")  # transformers leaves the MTP layer unloaded


def test_layers_after_the_last_follow_the_output_vocabulary(deepseek_mtp, tmp_path, capsys):
    from test_vocabulary import renumbered

    m = deepseek_mtp
    swapped = renumbered(m["expert1"], tmp_path / "swapped")  # rows of the MTP layer's embedding and head too
    recipe = lambda expert1, **extra: {"merge_method": "ties", "dtype": "float32", "base_model": m["base"], **extra,
                                       "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}}
                                                  for e in (m["expert0"], expert1)]}
    seme.merge(recipe(m["expert1"]), str(tmp_path / "plain"), progress=False)
    seme.merge(recipe(swapped, tokenizer_source="union"), str(tmp_path / "union"), progress=False)
    plain, union = load_folder(tmp_path / "plain"), load_folder(tmp_path / "union")
    assert sorted(plain) == sorted(union)
    for name in plain:
        torch.testing.assert_close(union[name], plain[name], msg=name)

    # A source without them: the reference's rows follow its own vocabulary, so they are left out.
    state = load_folder(swapped)
    from safetensors.torch import save_file
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.2.")},
              os.path.join(swapped, "model.safetensors"), metadata={"format": "pt"})
    seme.merge(recipe(swapped, tokenizer_source="union"), str(tmp_path / "lacking"), progress=False)
    assert "the layers after the last (model.layers.2) are left out: swapped lacks them" in capsys.readouterr().err
    assert not any(n.startswith("model.layers.2.") for n in load_folder(tmp_path / "lacking"))
    assert json.loads((tmp_path / "lacking" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert json.loads((tmp_path / "union" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def with_mtp_module(path: str, seed: int) -> None:
    """Add a multi-token-prediction module under mtp., as Qwen3-Next's and Qwen3.5's checkpoints store it
    (transformers does not load it): norms of the token's embedding and of the last hidden state, their
    projection, a copy of the last (full-attention) layer and a final norm; the head is the model's."""
    from safetensors.torch import load_file, save_file

    weights = f"{path}/model.safetensors"
    state = load_file(weights)
    last = f"model.layers.{json.loads(open(f'{path}/config.json').read())['num_hidden_layers'] - 1}."
    g = torch.Generator().manual_seed(seed)
    for name in [n for n in state if n.startswith(last)]:
        state["mtp.layers.0." + name[len(last):]] = state[name] + 0.01 * torch.randn(state[name].shape, generator=g)
    hidden = state["model.norm.weight"].numel()
    state["mtp.fc.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=g)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        state[f"mtp.{norm}.weight"] = 0.1 * torch.randn(hidden, generator=g)  # (1 + w) gains
    save_file(state, weights, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def qwen_mtp(tmp_path_factory):
    """base + 2 experts of a tiny Qwen3-Next (a linear-attention and a full-attention layer, experts), each
    with its MTP module."""
    return family_with(tmp_path_factory, "qwen3_next", with_mtp_module)


def test_an_unloaded_module_is_described_and_merged_by_name(qwen_mtp, tmp_path):
    from seme.architectures import for_config

    m = qwen_mtp
    e0, e1 = load_folder(m["expert0"]), load_folder(m["expert1"])
    arch = for_config(json.loads(open(f"{m['expert0']}/config.json").read()))
    mtp = [n for n in e0 if n.startswith("mtp.")]
    assert len(mtp) == 29 and all(arch.unloaded_module(n) == "mtp." for n in mtp)
    for name in mtp:
        r = arch.role(name)
        assert r is not None and (r.role != "read" or (e0[name].shape[-1] == 32 and r.norm in e0)), name
    assert arch.role("mtp.fc.weight").role == "inner" and arch.role("mtp.norm.weight").role == "norm"

    seme.merge(quarter_and_three_quarters(m), str(tmp_path / "whole"), progress=False)
    ours = load_folder(tmp_path / "whole")
    assert sorted(ours) == sorted(e0)
    for name in mtp:
        torch.testing.assert_close(ours[name], 0.25 * e0[name] + 0.75 * e1[name], msg=name)

    # A deeper output (layer 1 twice): the module keeps its names, from the last slice.
    seme.merge(last_layer_twice(m), str(tmp_path / "deeper"), progress=False)
    deeper = load_folder(tmp_path / "deeper")
    config = json.loads((tmp_path / "deeper" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["layer_types"][2] == "full_attention"
    assert sorted(n for n in deeper if n.startswith("mtp.")) == sorted(mtp)
    assert all(torch.equal(deeper[n], e1[n]) for n in mtp)
    reload_and_generate(tmp_path / "deeper")  # transformers leaves the MTP module unloaded

    recipe = {"merge_method": "ties", "dtype": "float32", "base_model": m["base"], "parameters": {"density": 0.5},
              "models": [{"model": m["expert0"], "parameters": {"weight": 0.5}},
                         {"model": m["expert1"], "parameters": {"weight": 0.5}}]}
    seme.merge(recipe, str(tmp_path / "ties"), progress=False)
    ties, base = load_folder(tmp_path / "ties"), load_folder(m["base"])
    assert sorted(ties) == sorted(e0) and not torch.equal(ties["mtp.fc.weight"], base["mtp.fc.weight"])


def test_tensors_outside_the_layers_are_never_layers_after_the_last(llama_family, tmp_path):
    """A config that counts no layers: every layer is after the last, the embeddings, final norm and head
    are not (they were taken for layer 0 and crashed the plan: None - 0)."""
    from seme import architectures
    from seme.io.model import ModelFolder
    from seme.plan import trailing_layers

    shutil.copytree(llama_family["expert0"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0}))
    model = ModelFolder.open(str(tmp_path / "m"))
    assert sorted(trailing_layers(architectures.for_config(model.config, model.tensors), model)) == sorted(
        n for n in model.tensors if n.startswith("model.layers."))


# DeepSeek-V3's MTP layer after the last, and Qwen3-Next's mtp.* module (unloaded by transformers)
TRAILING = pytest.mark.parametrize("models, prefix, where", [("deepseek_mtp", "model.layers.2.", "model.layers.2"),
                                                             ("qwen_mtp", "mtp.", "mtp.*")])


@TRAILING
def test_layers_after_the_last_missing_from_a_source_are_the_reference_s(models, prefix, where, request, tmp_path,
                                                                        capsys):
    from safetensors.torch import save_file

    m = request.getfixturevalue(models)
    plain = tmp_path / "plain"
    shutil.copytree(m["expert1"], plain)
    save_file({k: v for k, v in load_folder(plain).items() if not k.startswith(prefix)}, plain / "model.safetensors",
              metadata={"format": "pt"})
    recipe = {"merge_method": "ties", "dtype": "bfloat16", "base_model": m["base"], "parameters": {"density": 0.5},
              "models": [{"model": m["expert0"], "parameters": {"weight": 0.5}},
                         {"model": str(plain), "parameters": {"weight": 0.5}}]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    assert f"seme: warning: the layers after the last ({where}) are the reference's: plain lacks them" \
        in capsys.readouterr().err
    base, ours = load_folder(m["base"]), load_folder(tmp_path / "out")
    for name in (n for n in base if n.startswith(prefix)):
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], base[name].bfloat16()), name


@TRAILING
def test_seme_takes_the_pivot_s_layers_after_the_last(models, prefix, where, request, tmp_path, capsys):
    m = request.getfixturevalue(models)
    recipe = {"merge_method": "seme", "dtype": "float32", "base_model": m["base"],
              "models": [{"model": m["expert0"]}, {"model": m["expert1"]}]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    assert f"seme: warning: the layers after the last ({where}) are the pivot's" in capsys.readouterr().err
    base, ours = load_folder(m["base"]), load_folder(tmp_path / "out")
    assert sorted(ours) == sorted(base)
    for name in (n for n in base if n.startswith(prefix)):
        assert torch.equal(ours[name], base[name]), name
    assert not torch.equal(ours["model.layers.1.self_attn.o_proj.weight"], base["model.layers.1.self_attn.o_proj.weight"])


