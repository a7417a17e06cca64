"""Vocabulary re-mapping (tokenizer_source / tokenizer:): rows move to the output vocabulary's ids."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import seme
from conftest import build_family, load_folder
from test_parity_mergekit import run_mergekit

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def renumbered(src, dst, a="w1", b="w2"):
    """The same model with tokens a and b at each other's ids: its tokenizer (special tokens too),
    its embedding and LM head rows (a multimodal model's text ones) and the token ids its config
    names (a multimodal model's image token)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = data["model"]["vocab"]
    i, j = vocab[a], vocab[b]
    vocab[a], vocab[b] = j, i
    for token in data["added_tokens"]:
        token["id"] = vocab.get(token["content"], token["id"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    weights = os.path.join(dst, "model.safetensors")
    state = load_file(weights)
    for name in state:
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight",
                          "embed_tokens_per_layer.weight", "shared.weight", "word_embeddings.weight",
                          "cls.predictions.bias")):  # a multimodal model's text rows, a multi-token-prediction
            # layer's, Gemma 4's per-layer token table, T5's or BART's shared one, BERT's embeddings and head bias too
            state[name][[i, j]] = state[name][[j, i]].clone()
        elif name == "final_logits_bias":  # BART's head bias, [1, V]
            state[name][:, [i, j]] = state[name][:, [j, i]].clone()
    save_file(state, weights, metadata={"format": "pt"})
    path = os.path.join(dst, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config = {k: {i: j, j: i}.get(v, v) if k.endswith(("token_id", "token_index")) and isinstance(v, int) else v
              for k, v in config.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(dst)


def with_added_tokens(src, dst, tokens, seed, auto="AutoModelForCausalLM"):
    """The model with `tokens` added to its tokenizer and random rows for them."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    model = getattr(transformers, auto).from_pretrained(src)
    tokenizer.add_tokens(tokens)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = torch.randn(weight[old:].shape, generator=g) * 0.02
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return str(dst)


def ties(models, base, **extra):
    return {"merge_method": "ties", "base_model": base, "dtype": "float32", **extra,
            "models": [{"model": m, "parameters": {"weight": 0.7, "density": 0.6}} for m in models]}


def merged_alike(plain: dict, remapped: dict, tmp_path) -> dict:
    """Both recipes merged, to the same tensors bit for bit (the second's models renumbered, re-mapped back
    to the first's tokens); the first's tensors."""
    seme.merge(plain, str(tmp_path / "plain"), progress=False)
    seme.merge(remapped, str(tmp_path / "remapped"), progress=False)
    ours, theirs = load_folder(tmp_path / "plain"), load_folder(tmp_path / "remapped")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0, msg=name)
    return ours


@pytest.mark.parametrize("source", ["base", "union"])
def test_renumbered_tokens_merge_as_if_they_were_not(llama_family, tmp_path, source):
    # The same three models, one with two tokens' ids swapped: re-mapped into the base's vocabulary,
    # the merge is the one of the models as they were.
    other = renumbered(llama_family["expert1"], tmp_path / "renumbered")
    merged_alike(ties([llama_family["expert0"], llama_family["expert1"]], llama_family["base"]),
                 ties([llama_family["expert0"], other], llama_family["base"], tokenizer_source=source), tmp_path)


def test_a_second_token_table_follows_its_tokens(tmp_path):
    # Gemma 4's per-layer inputs: a table of a row per token besides the embedding, re-mapped with it
    from transformers import AutoTokenizer, Gemma4ForCausalLM

    gemma = build_family(str(tmp_path / "models"), "gemma4", n_experts=2, tied=True)
    other = renumbered(gemma["expert1"], tmp_path / "renumbered")
    plain = merged_alike(ties([gemma["expert0"], gemma["expert1"]], gemma["base"]),
                         ties([gemma["expert0"], other], gemma["base"], tokenizer_source="base"), tmp_path)
    assert "model.embed_tokens_per_layer.weight" in plain

    a = with_added_tokens(gemma["expert0"], tmp_path / "a", ["<x0>", "<x1>"], seed=1)
    b = with_added_tokens(gemma["expert1"], tmp_path / "b", ["<x1>", "<x2>"], seed=2)
    seme.merge(ties([a, b], gemma["base"], tokenizer={"source": "union"}), str(tmp_path / "union"), progress=False)
    union = load_folder(tmp_path / "union")
    assert union["model.embed_tokens_per_layer.weight"].shape[0] == union["model.embed_tokens.weight"].shape[0] == 99
    model = Gemma4ForCausalLM.from_pretrained(tmp_path / "union")
    assert model.config.vocab_size == model.config.vocab_size_per_layer_input == 99
    ids = AutoTokenizer.from_pretrained(tmp_path / "union")("w5 <x2> <x0>", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 99


def test_a_masked_lm_head_follows_its_tokens(tmp_path):
    # BERT's masked-LM head: its decoder tied to the word embeddings, its bias a value per token, re-mapped with them
    from transformers import AutoTokenizer, BertForMaskedLM

    bert = build_family(str(tmp_path / "models"), "bert_mlm", n_experts=2, tied=True)
    other = renumbered(bert["expert1"], tmp_path / "renumbered")
    plain = merged_alike(ties([bert["expert0"], bert["expert1"]], bert["base"]),
                         ties([bert["expert0"], other], bert["base"], tokenizer_source="union"), tmp_path)
    assert "cls.predictions.bias" in plain
    assert "cls.predictions.decoder.weight" not in plain  # tied heads stay tied

    a = with_added_tokens(bert["expert0"], tmp_path / "a", ["<x0>", "<x1>"], seed=1, auto="AutoModelForMaskedLM")
    b = with_added_tokens(bert["expert1"], tmp_path / "b", ["<x1>", "<x2>"], seed=2, auto="AutoModelForMaskedLM")
    seme.merge(ties([a, b], bert["base"], tokenizer={"source": "union"}), str(tmp_path / "union"), progress=False)
    union = load_folder(tmp_path / "union")
    assert union["cls.predictions.bias"].shape == (99,) and union["bert.embeddings.word_embeddings.weight"].shape[0] == 99
    model = BertForMaskedLM.from_pretrained(tmp_path / "union")
    assert model.config.vocab_size == 99
    assert torch.equal(model.cls.predictions.decoder.bias, union["cls.predictions.bias"])
    ids = AutoTokenizer.from_pretrained(tmp_path / "union")("w5 <x2> <x0>", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 99


def test_the_configs_token_ids_follow_the_output_vocabulary(llama_family, tmp_path):
    # a model whose '<s>' and 'w5' changed ids: its vocabulary as the output's moves the base's bos
    # token id (1) to where it has '<s>'; eos and pad stay
    other = renumbered(llama_family["expert1"], tmp_path / "renumbered", a="<s>", b="w5")
    seme.merge(ties([llama_family["expert0"], other], llama_family["base"], tokenizer_source=other),
               str(tmp_path / "out"), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    with open(os.path.join(other, "tokenizer.json"), encoding="utf-8") as f:
        assert config["bos_token_id"] == json.load(f)["model"]["vocab"]["<s>"] == 8
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 0)


def test_union_of_added_tokens_matches_mergekit(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = with_added_tokens(llama_family["expert0"], tmp_path / "a", ["<x0>", "<x1>"], seed=1)
    b = with_added_tokens(llama_family["expert1"], tmp_path / "b", ["<x1>", "<x2>", "<x3>"], seed=2)
    recipe = ties([a, b], llama_family["base"], tokenizer={"source": "union", "pad_to_multiple_of": 8})
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    seme.merge(recipe, str(tmp_path / "seme"), progress=False)
    ours_tok, theirs_tok = AutoTokenizer.from_pretrained(tmp_path / "seme"), AutoTokenizer.from_pretrained(tmp_path / "mergekit")
    ours_vocab, theirs_vocab = ours_tok.get_vocab(), theirs_tok.get_vocab()
    assert ours_vocab.keys() == theirs_vocab.keys() and len(ours_vocab) == 96 + 4
    ours, theirs = load_folder(tmp_path / "seme"), load_folder(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name in VOCAB_TENSORS:
            assert ours[name].shape == theirs[name].shape == (104, 32)  # 100 tokens padded to a multiple of 8
            by_token = [theirs_vocab[t] for t, _ in sorted(ours_vocab.items(), key=lambda item: item[1])]
            torch.testing.assert_close(ours[name][:100], theirs[name][by_token], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(ours[name][100:], theirs[name][100:], rtol=1e-5, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "seme")
    assert model.config.vocab_size == 104
    ids = ours_tok("w5 <x3> <x0>", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 104


def merged_as_mergekit_by_token(recipe: dict, tmp_path) -> tuple[dict, dict]:
    """The recipe merged by seme and by mergekit, equal token by token (mergekit's union numbers its regular tokens
    in hash order); seme's tensors and vocabulary."""
    from transformers import AutoTokenizer

    run_mergekit(recipe, str(tmp_path / "mergekit"))
    seme.merge(recipe, str(tmp_path / "seme"), progress=False)
    ours_vocab = AutoTokenizer.from_pretrained(tmp_path / "seme").get_vocab()
    theirs_vocab = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    assert ours_vocab.keys() == theirs_vocab.keys()
    by_token = [theirs_vocab[t] for t, _ in sorted(ours_vocab.items(), key=lambda item: item[1])]
    ours, theirs = load_folder(tmp_path / "seme"), load_folder(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        expected = theirs[name]
        if name in VOCAB_TENSORS:
            assert ours[name].shape == expected.shape, name
            expected = torch.cat([expected[by_token], expected[len(by_token):]])  # the padding rows stay
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    return ours, ours_vocab


def test_without_a_base_model_a_token_some_models_lack_takes_their_mean(llama_family, tmp_path):
    # <x1> is in a and b, not in expert2: with no base model to take it from, expert2's row is the mean of a's and
    # b's, as in mergekit (it was the first model's, taken for a base)
    a = with_added_tokens(llama_family["expert0"], tmp_path / "a", ["<x0>", "<x1>"], seed=1)
    b = with_added_tokens(llama_family["expert1"], tmp_path / "b", ["<x1>", "<x2>"], seed=2)
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (a, b, llama_family["expert2"])]}
    merged, vocab = merged_as_mergekit_by_token(recipe, tmp_path)
    rows_a, rows_b = load_folder(a), load_folder(b)
    for name in VOCAB_TENSORS:  # equal weights: the mean of a's row (<x1> is a's 97th), b's (its 96th) and theirs
        torch.testing.assert_close(merged[name][vocab["<x1>"]], (rows_a[name][97] + rows_b[name][96]) / 2)


def padded(src, dst, rows: int, seed: int):
    """The model with random embedding and LM head rows past its tokenizer's tokens, up to `rows` (its vocab_size)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = os.path.join(dst, "model.safetensors")
    state = load_file(weights)
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        extra = torch.randn((rows - state[name].shape[0], state[name].shape[1]), generator=g)
        state[name] = torch.cat([state[name], extra])
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return str(dst)


def test_padding_rows_take_the_mean_where_the_models_are_padded_alike(llama_family, tmp_path):
    # 96 tokens in 128 rows, padded to a multiple of 64: the vocabularies agree, but the rows past them are each
    # model's own padding, which take the mean of its token rows as in mergekit (they were merged as they were)
    a = padded(llama_family["expert0"], tmp_path / "a", 128, seed=1)
    b = padded(llama_family["expert1"], tmp_path / "b", 128, seed=2)
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer": {"source": "base", "pad_to_multiple_of": 64},
              "base_model": a, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b)]}
    merged, _ = merged_as_mergekit_by_token(recipe, tmp_path)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (128, 32)
        torch.testing.assert_close(merged[name][96:], merged[name][:96].mean(0).expand(32, -1))


def test_tokens_the_tokenizer_config_adds_are_in_the_vocabulary(llama_family, tmp_path):
    # a tokenizer_config.json naming a pad token that tokenizer.json lacks: transformers adds it (id 96), here a
    # token of the model's 97th row. Its tokenizer as the output's keeps that row, as in mergekit (tokenizer.json
    # alone was read: the output had 96 rows, and a tokenizer whose pad token was out of range)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded_model = tmp_path / "pad"
    padded(llama_family["expert1"], padded_model, 97, seed=3)
    settings = json.loads((padded_model / "tokenizer_config.json").read_text())
    (padded_model / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "<|pad|>"}))
    recipe = {"merge_method": "linear", "dtype": "float32", "base_model": llama_family["base"],
              "tokenizer_source": str(padded_model),
              "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (llama_family["base"], str(padded_model))]}
    merged, vocab = merged_as_mergekit_by_token(recipe, tmp_path)
    assert vocab["<|pad|>"] == 96 and merged["model.embed_tokens.weight"].shape == (97, 32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "seme")
    ids = tokenizer("w1 w2", padding="max_length", max_length=4, return_tensors="pt").input_ids
    assert ids[0, -1] == 96 and AutoModelForCausalLM.from_pretrained(tmp_path / "seme")(ids).logits.shape[-1] == 97


def test_a_head_bias_follows_its_tokens_as_in_mergekit(tmp_path):
    # phi's LM head has a bias: a value per token, re-mapped with the head's rows
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    phi = build_family(str(tmp_path / "models"), "phi", n_experts=2)
    a = with_added_tokens(phi["expert0"], tmp_path / "a", ["<x0>", "<x1>"], seed=1)
    b = with_added_tokens(phi["expert1"], tmp_path / "b", ["<x1>", "<x2>"], seed=2)
    for seed, path in enumerate((phi["base"], a, b)):  # biases of distinct values, the added tokens' too
        weights = os.path.join(path, "model.safetensors")
        state = load_file(weights)
        state["lm_head.bias"] = torch.randn(state["lm_head.bias"].shape, generator=torch.Generator().manual_seed(seed))
        save_file(state, weights, metadata={"format": "pt"})
    recipe = ties([a, b], phi["base"], tokenizer={"source": "union"})
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    seme.merge(recipe, str(tmp_path / "seme"), progress=False)
    ours_vocab = AutoTokenizer.from_pretrained(tmp_path / "seme").get_vocab()
    theirs_vocab = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    by_token = [theirs_vocab[t] for t, _ in sorted(ours_vocab.items(), key=lambda item: item[1])]
    ours, theirs = load_folder(tmp_path / "seme"), load_folder(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys() and ours["lm_head.bias"].shape == (96 + 3,)
    for name in ours:
        expected = theirs[name][by_token] if name in VOCAB_TENSORS + ("lm_head.bias",) else theirs[name]
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_vocabularies_that_agree_keep_the_fast_path(llama_family, tmp_path):
    from seme import config, plan

    recipe = config.load(ties([llama_family["expert0"], llama_family["expert1"]], llama_family["base"],
                              tokenizer_source="union"))
    merged = plan.make_plan(recipe)
    assert merged.vocabulary is None and not any(t.remap_rows for t in merged.tasks)


def test_dry_run_shows_the_remapping(llama_family, tmp_path, capsys):
    import yaml

    from seme.merge import main

    other = renumbered(llama_family["expert1"], tmp_path / "renumbered")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties([llama_family["expert0"], other], llama_family["base"], tokenizer_source="base")))
    assert main([str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "vocabulary: base, 96 tokens in 96 rows; embedding and LM head rows re-mapped" in capsys.readouterr().out


def test_token_sources_match_mergekit(llama_family, tmp_path):
    from transformers import AutoTokenizer

    a = with_added_tokens(llama_family["expert0"], tmp_path / "a", ["<x0>"], seed=3)
    e1 = llama_family["expert1"]
    tokens = {
        "<new>": {"source": {"kind": "zero"}},  # in no model: added to the vocabulary, zero rows
        "<x0>": {"source": a},  # only in a: a's row, as without the entry
        "w5": {"source": {"kind": "model_token", "model": e1, "token": "w9"}, "force": True},  # every model: e1's w9
        "w7": {"source": {"kind": "model_token", "model": a, "token_id": 3}},  # all have it, not forced: unchanged
    }
    # (source union: with source base, mergekit 0.1.5 adds the new tokens to the base's own tokenizer
    # object and then fails with a KeyError on them)
    recipe = ties([a, e1], llama_family["base"], tokenizer={"source": "union", "tokens": tokens})
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    seme.merge(recipe, str(tmp_path / "seme"), progress=False)
    ours_vocab = AutoTokenizer.from_pretrained(tmp_path / "seme").get_vocab()
    theirs_vocab = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    assert ours_vocab == theirs_vocab and {"<new>", "<x0>"} <= ours_vocab.keys()
    ours, theirs = load_folder(tmp_path / "seme"), load_folder(tmp_path / "mergekit")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    e1_rows = load_folder(e1)
    w5, w9 = ours_vocab["w5"], ours_vocab["w9"]
    for name in VOCAB_TENSORS:  # forced: every model's w5 row was e1's w9 row, so TIES keeps it
        torch.testing.assert_close(ours[name][w5], e1_rows[name][w9], rtol=1e-6, atol=1e-6)
        assert not ours[name][ours_vocab["<new>"]].any()


def test_tokens_added_to_the_base_vocabulary(llama_family, tmp_path):
    # mergekit 0.1.5 fails here (see above); the added token gets its row and the model loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = ties([llama_family["expert0"], llama_family["expert1"]], llama_family["base"],
                  tokenizer={"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}},
                                                          "<copy>": {"source": {"kind": "model_token", "model": llama_family["expert0"],
                                                                                "token": "w4"}}}})
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tokenizer.get_vocab()
    assert vocab["<new>"] == 96 and vocab["<copy>"] == 97
    merged, e0 = load_folder(tmp_path / "out"), load_folder(llama_family["expert0"])
    for name in VOCAB_TENSORS:
        assert merged[name].shape[0] == 98 and not merged[name][96].any()
        torch.testing.assert_close(merged[name][97], e0[name][vocab["w4"]])  # every model's row: TIES keeps it
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model(tokenizer("w1 <copy> <new>", return_tensors="pt").input_ids).logits.shape[-1] == 98


def test_max_memory_counts_the_remapped_rows(llama_family, tmp_path):
    from seme.errors import SemeError

    # embedding and head: 96 x 32 fp32 = 12288 bytes; three inputs, three results, three re-mapped copies and,
    # merged by the torch engine, the kernel's result before it is copied into the output's buffer
    other = renumbered(llama_family["expert1"], tmp_path / "renumbered")
    plain = ties([llama_family["expert0"], llama_family["expert1"]], llama_family["base"])
    seme.merge(plain, str(tmp_path / "plain"), progress=False, max_memory=100_000)
    remapped = ties([llama_family["expert0"], other], llama_family["base"], tokenizer_source="base")
    with pytest.raises(SemeError, match=r"--max-memory 100\.0 kB .*adapted or re-mapped copies.*: 122\.9 kB"):
        seme.merge(remapped, str(tmp_path / "remapped"), progress=False, max_memory=100_000)
    seme.merge(remapped, str(tmp_path / "remapped"), progress=False, max_memory=122_880)


def test_a_model_without_tokenizer_files_is_refused_in_one_line(llama_family, tmp_path, capsys):
    import yaml

    from seme.merge import main

    bare = tmp_path / "bare"
    shutil.copytree(llama_family["expert0"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties([str(bare)], llama_family["base"], tokenizer_source="union")))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["seme: error: config: tokenizer_source: bare has no tokenizer files to read its vocabulary from"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["base", "union"])
def test_a_base_tokenizer_past_its_vocab_size_is_refused(llama_family, tmp_path, capsys, source):
    import yaml

    from seme.merge import main

    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = 90  # the tokenizer has 96 tokens
    (base / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties([llama_family["expert0"]], str(base), tokenizer_source=source)))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tokenizer_source: {source}: the tokenizer of base has 6 tokens past its vocab_size (90)" in err[0]


@pytest.mark.parametrize("token_id", ["5", 0.5, -1, None])
@pytest.mark.parametrize("reader", ["tokenizer_source", "seme"])
def test_a_vocabulary_whose_ids_are_no_row_numbers_is_refused(llama_family, tmp_path, capsys, token_id, reader):
    # tokenizer_source and SeMe read vocabularies as transformers loads them (seme.vocabulary.load_tokenizer): its
    # tokenizers library refuses the file
    import yaml

    from seme.merge import main

    other = tmp_path / "other"
    shutil.copytree(llama_family["expert0"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"]["w7"] = token_id
    (other / "tokenizer.json").write_text(json.dumps(data))
    recipe = tmp_path / "r.yml"
    if reader == "seme":
        recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": llama_family["base"],
                                          "models": [{"model": str(other)}], "dtype": "float32"}))
    else:
        recipe.write_text(yaml.safe_dump(ties([str(other)], llama_family["base"], tokenizer_source="union")))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not (tmp_path / "out").exists()
    what = "config: tokenizer_source" if reader == "tokenizer_source" else "SeMe"
    assert err[0].startswith(f"seme: error: {what}: cannot load the tokenizer of other: "), err


@pytest.mark.parametrize("reader", ["tokenizer_source", "seme"])
def test_a_models_own_code_is_never_run_to_read_its_vocabulary(llama_family, tmp_path, monkeypatch, reader):
    # unless told trust_remote_code=False, transformers asks on stdin whether to run the code a config's auto_map
    # names (waiting 15 s in a terminal), and runs it on a yes: seme never runs a model's code, nor asks
    import builtins

    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    own = tmp_path / "own"
    shutil.copytree(llama_family["expert0"], own)
    config = json.loads((own / "config.json").read_text())
    config.update(model_type="own_llama", auto_map={"AutoConfig": "configuration_own.OwnConfig"})
    (own / "config.json").write_text(json.dumps(config))
    (own / "configuration_own.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    recipe = ties([str(own)], llama_family["base"], tokenizer_source="union") if reader == "tokenizer_source" else \
        {"merge_method": "seme", "base_model": llama_family["base"], "models": [{"model": str(own)}],
         "dtype": "float32"}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    assert not asked and not (tmp_path / "ran").exists()


def test_a_tokenizer_that_is_its_own_code_is_refused_in_one_line(llama_family, tmp_path, capsys):
    import yaml

    from seme.merge import main

    own = tmp_path / "own"
    shutil.copytree(llama_family["expert0"], own)
    settings = json.loads((own / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="OwnTokenizer", auto_map={"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]})
    (own / "tokenizer_config.json").write_text(json.dumps(settings))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties([str(own)], llama_family["base"], tokenizer_source="union")))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "seme: error: config: tokenizer_source: the tokenizer of own is its own code (tokenizer_config.json's "
        "auto_map), which seme never runs"]
