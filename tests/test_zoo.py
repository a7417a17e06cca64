"""The small variant of the merge-quality zoo (bench.zoo.SMALL): it builds in seconds, meets its own
requirements, its heterogeneous members are what they claim to be, and merges of it run through
bench.quality's evaluation path."""
from __future__ import annotations

import os
import time

import pytest
import torch

from bench import quality, zoo


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zoo"))
    return root, zoo.build(root, zoo.SMALL, jobs=2, log=lambda *_: None)


def test_the_small_zoo_meets_its_requirements(small_zoo):
    _, manifest = small_zoo
    assert [c["name"] for c in manifest["checks"]] and all(c["passed"] for c in manifest["checks"]), manifest["checks"]


def test_a_second_build_is_a_no_op(small_zoo):
    root, manifest = small_zoo
    start = time.perf_counter()
    assert zoo.build(root, zoo.SMALL, log=lambda *_: None) == manifest
    assert time.perf_counter() - start < 1


def test_teacher_forced_exact_match_is_greedy_decoding(small_zoo):
    root, _ = small_zoo
    examples = zoo.test_sets(zoo.SMALL, "test")["rev"][:30]
    for name in ("base", "expert-rev"):  # mostly wrong, mostly right
        model, vocab = zoo.load(os.path.join(root, name))
        greedy = 0
        for prompt, answer in examples:
            ids = torch.tensor([[vocab[t] for t in prompt]])
            out = model.generate(ids, max_new_tokens=len(answer), do_sample=False, pad_token_id=zoo.PAD,
                                 eos_token_id=None)
            greedy += out[0, ids.shape[1]:].tolist() == [vocab[t] for t in answer]
        assert zoo.evaluate(model, vocab, {"rev": examples})["rev"] == pytest.approx(greedy / len(examples))


def test_heterogeneous_members_are_what_they_claim(small_zoo):
    root, manifest = small_zoo
    scores = {n: m["scores"]["test"] for n, m in manifest["models"].items()}
    sort = zoo.HETERO_SKILL
    # rotation and renaming change coordinates, not the function
    assert scores[f"rotated-{sort}"][sort] == scores[f"expert-{sort}"][sort]
    assert scores[f"vocab-{sort}"][sort] == scores[f"expert-{sort}"][sort]
    assert scores[f"vocab-{sort}"][zoo.FACT] is None  # its fact keys are spelt differently
    a, _ = zoo.load(os.path.join(root, f"expert-{sort}"))
    b, _ = zoo.load(os.path.join(root, f"rotated-{sort}"))
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight, atol=1e-2)
    deep, _ = zoo.load(os.path.join(root, f"deep-{sort}"))
    assert deep.config.num_hidden_layers > a.config.num_hidden_layers
    other_base, _ = zoo.load(os.path.join(root, "base2"))
    base, _ = zoo.load(os.path.join(root, "base"))
    assert not torch.allclose(base.lm_head.weight, other_base.lm_head.weight, atol=1e-2)


def test_merges_run_through_the_quality_evaluation_path(small_zoo):
    root, manifest = small_zoo
    cfg = zoo.config_of(manifest)
    members = quality.SETS["4 experts"]
    results = {m: [(p, quality.merge_and_evaluate(root, cfg, members, m, p))] for m, p in
               (("ties", {"density": 0.5, "lambda": 1.0}), ("seme", {"select_topk": 1.0}), ("passthrough", {}))}
    assert "error" in results["passthrough"][0][1]
    for method in ("ties", "seme"):
        summary = quality.summarise(manifest, members, results[method][0][1], "test")
        assert set(summary["em"]) == set(zoo.SKILLS) and 0 <= summary["normalised"] <= 1.5
    assert len(results["seme"][0][1]["alignment"]) == len(members)
    rotated = quality.merge_and_evaluate(root, cfg, quality.SETS["rotated"], "seme", {"select_topk": 1.0})
    assert rotated["alignment"][1]["applied"] and rotated["alignment"][1]["distance"] > 1  # a random rotation
    deep = quality.merge_and_evaluate(root, cfg, quality.SETS["deep"], "linear", {})
    assert "error" in deep  # layers do not line up: refused, not silently dropped
    summary, body, chosen = quality.tables(manifest, {"4 experts": results})
    assert "cannot merge this set" in body and "| 4 experts | 2 of 3 |" in summary
    assert chosen["4 experts"]["seme"][2]["normalised"] == quality.summarise(manifest, members, results["seme"][0][1],
                                                                             "test")["normalised"]
