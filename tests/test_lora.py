"""LoRA references (`model+adapter`): the adapter's update is added as the model is read."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest
import torch
import yaml

import seme
from conftest import build_model, load_folder
from seme.merge import main


def make_adapter(model_path, folder, seed, targets=("q_proj", "v_proj", "down_proj", "embed_tokens"), **config):
    """A LoRA adapter for the model with every trainable tensor random (A and B non-zero), and the model
    with it merged as peft loads and merges it (what mergekit does, and a user would)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **config)
    wrapped = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if p.requires_grad:  # LoRA pairs, DoRA magnitudes, biases, tokens and modules to save
                noise = torch.randn(p.shape, generator=g).to(p.dtype) * 0.1
                p.copy_(noise if "lora_A" in name or "lora_B" in name or "lora_embedding" in name else p + noise)
    wrapped.save_pretrained(folder / "adapter")
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model_path),
                                              str(folder / "adapter"))
    reloaded.merge_and_unload().save_pretrained(folder / "merged")
    for f in os.listdir(model_path):
        if f.startswith("token") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(model_path, f), folder / "merged" / f)
    return str(folder / "adapter"), str(folder / "merged")


def linear(*models):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (0.6, 0.4))]}


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "alpha_pattern": {"v_proj": 16}}])
def test_an_adapter_merges_as_the_model_peft_merged_it_into(llama_family, tmp_path, config):
    adapter, merged = make_adapter(llama_family["expert0"], tmp_path, seed=1, **config)
    seme.merge(linear(merged, llama_family["expert1"]), str(tmp_path / "reference"), progress=False)
    seme.merge(linear(f"{llama_family['expert0']}+{adapter}", llama_family["expert1"]), str(tmp_path / "lora"),
               progress=False)
    reference, ours = load_folder(tmp_path / "reference"), load_folder(tmp_path / "lora")
    assert reference.keys() == ours.keys()
    plain = load_folder(llama_family["expert0"])
    assert not torch.equal(load_folder(merged)["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)


def test_adapter_weights_saved_in_other_dtypes_are_held_as_peft_holds_them(llama_family, tmp_path):
    """peft casts what it loads to its layers' dtype: an A saved in fp64 beside an fp32 B (exactly the fp32
    values) merges as the adapter saved in fp32 does."""
    from safetensors.torch import load_file, save_file

    adapter, merged = make_adapter(llama_family["expert0"], tmp_path, seed=1)
    weights = os.path.join(adapter, "adapter_model.safetensors")
    save_file({k: v.double() if ".lora_A." in k else v for k, v in load_file(weights).items()}, weights)
    seme.merge(linear(merged, llama_family["expert1"]), str(tmp_path / "reference"), progress=False)
    seme.merge(linear(f"{llama_family['expert0']}+{adapter}", llama_family["expert1"]), str(tmp_path / "lora"),
               progress=False)
    reference, ours = load_folder(tmp_path / "reference"), load_folder(tmp_path / "lora")
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)


ADAPTERS = {  # what peft can train beside plain LoRA: (family, LoraConfig arguments, tensors it changes)
    "dora": ("llama", dict(use_dora=True, targets=("q_proj", "embed_tokens")), {"model.embed_tokens.weight", "self_attn.q_proj.weight"}),
    "lora bias": ("qwen2", dict(lora_bias=True, targets=("q_proj", "v_proj")),
                  {"self_attn.q_proj.bias", "self_attn.v_proj.bias", "self_attn.q_proj.weight", "self_attn.v_proj.weight"}),
    "trained biases": ("qwen2", dict(bias="all", targets=("q_proj",)),
                       {"self_attn.k_proj.bias", "self_attn.q_proj.bias", "self_attn.v_proj.bias", "self_attn.q_proj.weight"}),
    "lora-only biases": ("qwen2", dict(bias="lora_only", targets=("k_proj",)),
                         {"self_attn.k_proj.bias", "self_attn.k_proj.weight"}),
    "modules to save": ("llama", dict(modules_to_save=["lm_head"], targets=("o_proj",)),
                        {"lm_head.weight", "self_attn.o_proj.weight"}),
    "trainable tokens": ("llama", dict(trainable_token_indices=[1, 5, 7], targets=("up_proj",)),
                         {"model.embed_tokens.weight", "mlp.up_proj.weight"}),
    "trainable tokens by module": ("llama", dict(trainable_token_indices={"embed_tokens": [3, 4]}, targets=("q_proj",)),
                                   {"model.embed_tokens.weight", "self_attn.q_proj.weight"}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", [*ADAPTERS, "plain"])
def test_adapted_tensors_are_the_ones_peft_merges(tmp_path, kind, dtype):
    from conftest import build_model
    from seme.io.model import ModelFolder

    family, config, changed = ADAPTERS.get(kind, ("llama", {}, {"model.embed_tokens.weight", "q_proj.weight", "v_proj.weight", "down_proj.weight"}))
    build_model(tmp_path / "model", family, layers=1, dtype=dtype)
    adapter, merged = make_adapter(str(tmp_path / "model"), tmp_path, seed=7, **config)
    model, reference, plain = ModelFolder.open(f"{tmp_path / 'model'}+{adapter}"), load_folder(merged), \
        load_folder(tmp_path / "model")
    assert model.tensors.keys() == reference.keys()
    assert {n for n in model.tensors if not torch.equal(plain[n], reference[n])} == \
        {n for n in model.tensors if any(n.endswith(c) for c in changed)}
    for name in model.tensors:
        ours = model.load(name)
        assert ours.dtype == reference[name].dtype == dtype, name
        assert torch.equal(ours, reference[name]), name


def test_an_adapter_matches_mergekit(llama_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    adapter, _ = make_adapter(llama_family["expert0"], tmp_path, seed=2)
    recipe = {"merge_method": "ties", "base_model": llama_family["base"], "dtype": "float32",
              "models": [{"model": f"{llama_family['expert0']}+{adapter}", "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": llama_family["expert1"], "parameters": {"weight": 0.5, "density": 0.5}}]}
    with contextlib.redirect_stderr(io.StringIO()):
        run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mergekit"),
                  options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                                       lora_merge_cache=str(tmp_path / "cache")))
    seme.merge(recipe, str(tmp_path / "seme"), progress=False)
    theirs, ours = load_folder(tmp_path / "mergekit"), load_folder(tmp_path / "seme")
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dry_run_and_card_name_the_adapter(llama_family, tmp_path, capsys):
    adapter, _ = make_adapter(llama_family["expert0"], tmp_path, seed=3)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear(f"{llama_family['expert0']}+{adapter}", llama_family["expert1"])))
    assert main([str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    assert f"model[0]: {llama_family['expert0']}+{adapter}" in capsys.readouterr().out
    assert main([str(recipe), str(tmp_path / "out")]) == 0
    assert f"{llama_family['expert0']}+{adapter}" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("layout", ["model.safetensors", "unindexed shards"])
def test_an_adapter_beside_the_weights_is_left_out_with_a_warning(llama_family, tmp_path, capsys, layout):
    """A model folder that keeps a PEFT adapter beside its own weights (Granite Speech's checkpoints do): the model's
    weights are merged as they are, and nothing of the adapter is read as one of them, even where the weights are
    shards that no index lists; a warning says that the output has no adapter."""
    adapter, _ = make_adapter(llama_family["expert0"], tmp_path, seed=5)
    folder = tmp_path / "with_adapter"
    shutil.copytree(llama_family["expert0"], folder)
    for f in os.listdir(adapter):
        shutil.copy(os.path.join(adapter, f), folder / f)
    if layout == "unindexed shards":
        os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear(str(folder), llama_family["expert1"])))
    assert main([str(recipe), str(tmp_path / "out")]) == 0
    assert ("seme: warning: with_adapter keeps a LoRA adapter beside its weights (adapter_config.json); its weights "
            "are merged without it and the output has none (name it as with_adapter+ADAPTER to apply it)"
            in capsys.readouterr().err)
    seme.merge(linear(llama_family["expert0"], llama_family["expert1"]), str(tmp_path / "plain"), progress=False)
    ours, plain = load_folder(tmp_path / "out"), load_folder(tmp_path / "plain")
    assert ours.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=0, atol=0, msg=name)
    assert not any(f.startswith("adapter_") for f in os.listdir(tmp_path / "out"))


def _with_config(adapter, **changes):
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("case,message", [
    ("three parts", "is neither a model nor a model+adapter reference"),
    ("not an adapter", "has no adapter_config.json (not a LoRA adapter)"),
    ("tied head", "the adapter saves 'lm_head.weight', which the model does not store (tied to its embeddings?)"),
    ("bad tokens", "trainable_token_indices names no distinct rows of 'model.embed_tokens' (0..95)"),
    ("unknown entry", "adapter entry 'lora_C' is not a LoRA entry"),
    ("bad lora bias", "has a LoRA bias of shape [31], and the model's layer no bias of that shape"),
    ("other peft", "a PREFIX_TUNING adapter; seme applies LoRA adapters only"),
    ("alpha not a number", "adapter_config.json: lora_alpha must be a finite number, got '16'"),
    ("alpha pattern no regex", "adapter_config.json: alpha_pattern['q_proj('] is no regular expression"),
    ("rank 0", "adapter module 'model.layers.0.self_attn.q_proj' has rank 0 (A [0, 32])"),
    ("adapter alone", "a LoRA adapter (adapter_config.json), not a model: name it with the model it adapts, as "
                      "MODEL+ADAPTER (trained on "),
])
def test_bad_adapters_are_one_line_errors(llama_family, qwen2_family, tmp_path, capsys, case, message):
    adapter, _ = make_adapter(llama_family["expert0"], tmp_path, seed=4)
    ref, other = f"{llama_family['expert0']}+{adapter}", llama_family["expert1"]
    if case == "three parts":
        ref += f"+{adapter}"
    elif case == "adapter alone":
        ref = adapter
    elif case == "not an adapter":
        ref = f"{llama_family['expert0']}+{llama_family['expert1']}"
    elif case == "tied head":
        tied = tmp_path / "tied"
        build_model(tied, tied=True, layers=1)
        adapter, _ = make_adapter(str(tied), tmp_path / "t", seed=4, modules_to_save=["lm_head"], targets=("q_proj",))
        ref = f"{tied}+{adapter}"
    elif case == "bad tokens":
        adapter, _ = make_adapter(llama_family["expert0"], tmp_path / "t", seed=4, trainable_token_indices=[3, 4],
                                    targets=("q_proj",))
        _with_config(adapter, trainable_token_indices=[3, 96])
        ref = f"{llama_family['expert0']}+{adapter}"
    elif case == "bad lora bias":
        from safetensors.torch import load_file, save_file

        adapter, _ = make_adapter(qwen2_family["expert0"], tmp_path / "t", seed=4, lora_bias=True, targets=("q_proj",))
        weights = os.path.join(adapter, "adapter_model.safetensors")
        entries = load_file(weights)
        key = next(k for k in entries if k.endswith("q_proj.lora_B.bias"))
        save_file({**entries, key: entries[key][:31]}, weights)
        ref, other = f"{qwen2_family['expert0']}+{adapter}", qwen2_family["expert1"]
    elif case == "unknown entry":
        from safetensors.torch import load_file, save_file

        weights = os.path.join(adapter, "adapter_model.safetensors")
        save_file({**load_file(weights), "lora_C": torch.zeros(1)}, weights)
    elif case == "alpha not a number":
        _with_config(adapter, lora_alpha="16")
    elif case == "alpha pattern no regex":
        _with_config(adapter, alpha_pattern={"q_proj(": 16})
    elif case == "rank 0":
        from safetensors.torch import load_file, save_file

        weights = os.path.join(adapter, "adapter_model.safetensors")
        entries = load_file(weights)
        a = next(k for k in entries if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
        save_file({**entries, a: entries[a][:0], a.replace("lora_A", "lora_B"): entries[a.replace("lora_A", "lora_B")][:, :0]},
                  weights)
    else:
        _with_config(adapter, peft_type="PREFIX_TUNING")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear(ref, other)))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_max_memory_counts_the_adapted_copies(llama_family, tmp_path):
    from seme.errors import SemeError

    # the embedding, 96 x 32 fp32 (12288 bytes), is adapted: its copy and two fp32 updates are held
    adapter, _ = make_adapter(llama_family["expert0"], tmp_path, seed=6)
    plain, adapted = linear(llama_family["expert0"], llama_family["expert1"]), \
        linear(f"{llama_family['expert0']}+{adapter}", llama_family["expert1"])
    needed = 2 * 12288 + 3 * 12288  # inputs and results of the largest tensor (the embedding and head)
    seme.merge(plain, str(tmp_path / "plain"), progress=False, max_memory=needed)
    with pytest.raises(SemeError, match="adapted or re-mapped copies"):
        seme.merge(adapted, str(tmp_path / "adapted"), progress=False, max_memory=needed)
    # and, merged by the torch engine, the kernel's result before it is copied into the output's buffer
    seme.merge(adapted, str(tmp_path / "adapted"), progress=False, max_memory=needed + 4 * 12288)
