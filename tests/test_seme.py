"""SeMe: semantic bases, the mapping kernel, alignment from LM heads alone, depth and vocabulary.

The central test rotates a trained tiny Llama's residual stream (same function, other
coordinates) and checks that SeMe recovers the rotation from the LM heads and merges as if the
rotation were not there, while a naive linear merge of the same models breaks.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import yaml

import seme
from bench.zoo import rotate  # fold norm gains, then turn the residual stream, by the role table
from conftest import build_model, load_folder, save_tokenizer
from seme.architectures import for_config
from seme.errors import SemeError
from seme.merge import main
from seme.semantic import alignment
from seme.semantic.bases import semantic_bases
from seme.semantic.layers import layer_map
from seme.semantic.mapping import mean_distribution, semantic_distribution, semantic_mix, semantic_topk

HIDDEN, VOCAB = 32, 128


# --- building blocks -----------------------------------------------------------------------------

def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def train(model, steps: int, seed: int, lr: float, offset: int = 0):
    """A few Adam steps on a copy task (second half of each sequence repeats the first)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        half = torch.randint(3, VOCAB // 2, (16, 8), generator=g) + offset
        ids = torch.cat([half, half], dim=1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


LLAMA = for_config({"architectures": ["LlamaForCausalLM"]})


def llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64, tie_word_embeddings=False))


def save(model, state: dict | None, path) -> str:
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(path)
    save_tokenizer(path, VOCAB)
    return str(path)


def logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A: a briefly trained tiny Llama; B: A fine-tuned a little; both also rotated."""
    root = tmp_path_factory.mktemp("seme")
    a = train(llama(), 60, seed=0, lr=3e-3)
    a_state = {k: v.detach().clone() for k, v in a.state_dict().items()}
    paths = {"A": save(a, None, root / "A")}
    b = train(a, 15, seed=1, lr=1e-3, offset=VOCAB // 2 - 3)
    b_state = {k: v.detach().clone() for k, v in b.state_dict().items()}
    paths["B"] = save(b, None, root / "B")
    Q = random_orthogonal(HIDDEN, 7)
    paths["rotA"] = save(llama(), rotate(a_state, LLAMA, Q), root / "rotA")
    paths["rotB"] = save(llama(), rotate(b_state, LLAMA, Q), root / "rotB")
    return paths, Q, a_state, b_state


def command_line_errors(recipe: dict, folder, capsys) -> list[str]:
    """The lines `python -m seme.merge` says on stderr for `recipe` (written into `folder`), which it must refuse
    as bad input (exit status 2) without writing the output `folder / "refused"`."""
    (folder / "recipe.yml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    status = main([str(folder / "recipe.yml"), str(folder / "refused")])
    assert status == 2 and not (folder / "refused").exists()
    return capsys.readouterr().err.strip().splitlines()


def seme_merge(pivot, sources, out, **params) -> dict:
    recipe = {"merge_method": "seme", "base_model": pivot, "dtype": "float32",
              "parameters": {"select_topk": 1.0, **params}, "models": [{"model": s} for s in sources]}
    seme.merge(yaml.safe_dump(recipe), str(out), progress=False, overwrite=True)
    with open(os.path.join(out, "seme_report.json")) as f:
        return json.load(f)


# --- §1 bases and §2 mapping ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_bases_match_float64_svd_pinv(dtype, tol):
    torch.manual_seed(0)
    W = (torch.randn(1000, 48) @ torch.diag(torch.logspace(0, 2, 48))).to(dtype)  # condition number ~1e4
    (bases,) = semantic_bases([W])
    oracle = torch.linalg.pinv(W.double()).T  # rows: pinv(W) e_i
    err = (bases.materialize().double() - oracle).norm() / oracle.norm()
    assert err < tol, float(err)  # fp64 Gram accumulation: the fp32 normal equations would lose ~1e-2 here
    assert bases.condition > 1e3 and bases.ridge == 0.0


def test_rank_deficient_head_gets_a_ridge():
    W = torch.randn(200, 16)
    W[:, 3] = W[:, 2]
    (bases,) = semantic_bases([W])
    assert bases.ridge > 0 and torch.isfinite(bases.materialize()).all()


@pytest.mark.parametrize("scales", [(0, 0), (0, 3.5)])  # well conditioned; cond(G) ~1e7: G⁻¹ in fp64
def test_signature_from_head_and_inverse_gram_equals_materialised_bases(scales):
    torch.manual_seed(3)
    W = torch.randn(1500, 32) @ torch.diag(torch.logspace(*scales, 32))
    (bases,) = semantic_bases([W])
    queries, weights = torch.randn(40, 32), torch.rand(40)
    expected = mean_distribution(queries, bases.materialize(unit=True), weights, temperature=0.05, chunk=256)
    got = mean_distribution(queries, bases, weights, temperature=0.05, chunk=256)  # never forms S
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


# Cosine blocks (256 tokens; the last of 2300 has 252) kept from the first pass: none, some, all, and room
# for 3 blocks and the last one's width, which must not keep the last block out of order.
@pytest.mark.parametrize("kept", [0, 3, 10, 3 + 253 / 256])
def test_mean_distribution_equals_the_weighted_mean_of_softmaxes(monkeypatch, kept):
    from seme.semantic import mapping

    torch.manual_seed(4)
    keys = torch.nn.functional.normalize(torch.randn(2300, 24), dim=1)
    queries, weights = torch.randn(9, 24), torch.rand(9)
    monkeypatch.setattr(mapping, "_KEPT_COSINES", int(kept * 256) * 9 * 4)
    got = mean_distribution(queries, keys, weights, temperature=0.05, chunk=256)
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    p = torch.softmax(q @ keys.double().T / 0.05, dim=1)
    expected = (weights.double()[:, None] * p).sum(0) / weights.double().sum()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-9)


def unit_pinv_rows(W: torch.Tensor) -> torch.Tensor:
    """The float64 oracle of the unit bases: rows of pinv(W)ᵀ by SVD, normalised."""
    return torch.nn.functional.normalize(torch.linalg.pinv(W.double()).T, dim=1)


@pytest.mark.parametrize("scales", [(0, 0), (0, 1.5)])
def test_alignment_map_from_heads_matches_the_float64_oracle(scales):
    torch.manual_seed(2)
    heads = [torch.randn(900, 24) @ torch.diag(torch.logspace(*scales, 24)), torch.randn(1000, 32)]
    src, piv = semantic_bases(heads)
    piv_ids = torch.randperm(1000)[:700]  # a partly shared, reordered vocabulary
    src_ids = torch.randperm(900)[:700]
    oracle = unit_pinv_rows(heads[1])[piv_ids].T @ unit_pinv_rows(heads[0])[src_ids]
    materialised = piv.unit_rows(index=piv_ids).T.double() @ src.unit_rows(index=src_ids).double()
    got = alignment.alignment_map(src, piv, src_ids, piv_ids, chunk=128)  # never forms the bases
    assert got.shape == (32, 24) and got.dtype == torch.float64
    assert (got - oracle).abs().max() <= (materialised - oracle).abs().max() + 1e-9
    with pytest.raises(ValueError, match="do not pair up"):
        alignment.alignment_map(src, piv, src_ids[:5], piv_ids)


@pytest.mark.parametrize("mode, topk", [("softmax", None), ("softmax", 7), ("linear", None)])
def test_mapping_of_semantic_bases_equals_the_materialised_one(mode, topk):
    torch.manual_seed(4)
    keys, values = semantic_bases([torch.randn(600, 20) @ torch.diag(torch.logspace(0, 1, 20)), torch.randn(600, 12)])
    q = torch.randn(9, 20)
    expected = semantic_mix(q, keys.materialize(unit=True), values.materialize(unit=True), temperature=0.07,
                            topk=topk, mode=mode, chunk=100)
    got = semantic_mix(q, keys, values, temperature=0.07, topk=topk, mode=mode, chunk=100)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    subset = torch.randperm(600)[:450]
    expected = semantic_mix(q, keys.unit_rows(index=subset), values.unit_rows(index=subset), temperature=0.07,
                            topk=topk, mode=mode, chunk=100)
    got = semantic_mix(q, keys.subset(subset), values.subset(subset), temperature=0.07, topk=topk, mode=mode,
                       chunk=100)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, topk", [("softmax", None), ("softmax", 5), ("linear", None)])
def test_mapping_matches_a_materialised_reference(mode, topk):
    torch.manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(777, 24), dim=1)
    values = torch.randn(777, 10)
    q = torch.randn(9, 24)
    got = semantic_mix(q, keys, values, temperature=0.07, topk=topk, mode=mode, chunk=100)
    cos = torch.nn.functional.normalize(q, dim=1) @ keys.T
    if mode == "linear":
        ref = cos @ values
    elif topk is None:
        ref = semantic_distribution(q, keys, 0.07) @ values
    else:
        best, idx = torch.topk(cos, topk, dim=1)
        ref = torch.einsum("bk,bkd->bd", torch.softmax(best / 0.07, 1), values[idx])
        assert torch.equal(semantic_topk(torch.nn.functional.normalize(q, dim=1), keys, topk, chunk=100)[1], idx)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# --- §3 alignment ------------------------------------------------------------------------------

def test_rotated_model_computes_the_same_function(trained):
    paths, _, _, _ = trained
    ids = torch.randint(3, VOCAB, (2, 12))
    torch.testing.assert_close(logits(paths["rotB"], ids), logits(paths["B"], ids), rtol=1e-4, atol=1e-4)


def test_each_role_turns_with_the_stream():
    """h' = Q h: a reader's output stays, a writer's and a stream map's output turn with the stream (a map of the
    normalised stream's with its norm's gain), and a vector in the stream (Llava-NeXT's image_newline) is read as it
    was."""
    Q, x = random_orthogonal(HIDDEN, 3), torch.randn(5, HIDDEN)
    W = {"read": torch.randn(7, HIDDEN), "write": torch.randn(HIDDEN, 7), "stream_map": torch.randn(HIDDEN, HIDDEN),
         "stream_vector": torch.randn(HIDDEN)}
    turned = {role: alignment.rotate(w, role, "out_in", Q, None, None) for role, w in W.items()}
    torch.testing.assert_close((x @ Q.T) @ turned["read"].T, x @ W["read"].T)
    torch.testing.assert_close(turned["stream_vector"] @ turned["read"].T, W["stream_vector"] @ W["read"].T)
    h = torch.randn(5, 7)
    torch.testing.assert_close(h @ turned["write"].T, (h @ W["write"].T) @ Q.T)
    torch.testing.assert_close((x @ Q.T) @ turned["stream_map"].T, (x @ W["stream_map"].T) @ Q.T)
    # a stream map of the normalised stream (DeciLM's linear attention) folds the source's gain, takes the pivot's
    g, p = torch.rand(HIDDEN) + 0.5, torch.rand(HIDDEN) + 0.5
    normed = alignment.rotate(W["stream_map"], "stream_map", "out_in", Q, g, p)
    torch.testing.assert_close(((x @ Q.T) * p) @ normed.T, ((x * g) @ W["stream_map"].T) @ Q.T)


def recovered_rotation(pivot_state, source_state, mode: str = "linear") -> torch.Tensor:
    heads = [s["lm_head.weight"] * s["model.norm.weight"] for s in (source_state, pivot_state)]
    src, piv = semantic_bases(heads)
    return alignment.orthogonal_factor(alignment.alignment_map(src, piv, mode=mode))


def test_alignment_recovers_a_pure_rotation_exactly(trained, tmp_path):
    paths, Q, a_state, _ = trained
    rot_a = rotate(a_state, LLAMA, Q)
    Q_hat = recovered_rotation(a_state, rot_a)
    assert float((Q_hat.float() - Q.T).abs().max()) < 1e-4  # h_A = Qᵀ h_rotA
    # Merging A with its own rotation (one source, nothing trimmed) gives back A.
    report = seme_merge(paths["A"], [paths["rotA"]], tmp_path / "out")
    assert report["sources"][0]["applied"] and report["sources"][0]["distance_from_identity"] > 1.0
    merged, original = load_folder(tmp_path / "out"), load_folder(paths["A"])
    for name, t in original.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-4, atol=1e-4, msg=name)


def test_probability_mode_alignment_recovers_a_pure_rotation(trained, tmp_path):
    paths, Q, a_state, _ = trained
    Q_hat = recovered_rotation(a_state, rotate(a_state, LLAMA, Q), mode="probability")
    # φ smooths over near neighbours (T = 0.05), so A is Q up to a near-identity factor the polar factor
    # removes: measured 1.8e-4 here.
    assert float((Q_hat.float() - Q.T).abs().max()) < 1e-3
    report = seme_merge(paths["A"], [paths["rotA"]], tmp_path / "out", align_mode="probability")
    assert report["sources"][0]["applied"] and report["sources"][0]["mode"] == "probability"


def test_alignment_of_a_rotated_fine_tune_is_close_and_improves_with_smaller_deltas(trained):
    _, Q, a_state, b_state = trained
    errors = []
    for scale in (1.0, 0.25):  # shrink the fine-tune delta
        state = {k: a_state[k] + scale * (b_state[k] - a_state[k]) for k in a_state}
        Q_hat = recovered_rotation(a_state, rotate(state, LLAMA, Q))
        errors.append(float(torch.linalg.norm(Q_hat.float() - Q.T)) / HIDDEN ** 0.5)
    assert errors[0] < 0.1, errors
    assert errors[1] < errors[0] / 2, errors


def test_seme_merges_a_rotated_fine_tune_and_naive_averaging_breaks(trained, tmp_path):
    paths, _, _, _ = trained
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    seme_merge(paths["A"], [paths["B"]], tmp_path / "plain")
    report = seme_merge(paths["A"], [paths["rotB"]], tmp_path / "aligned")
    assert report["sources"][0]["applied"]
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": paths["A"], "parameters": {"weight": 0.5}},
                         {"model": paths["rotB"], "parameters": {"weight": 0.5}}]}
    seme.merge(recipe, str(tmp_path / "naive"), progress=False)
    target = logits(tmp_path / "plain", ids)
    aligned_err = float((logits(tmp_path / "aligned", ids) - target).norm() / target.norm())
    naive_err = float((logits(tmp_path / "naive", ids) - target).norm() / target.norm())
    assert aligned_err < 0.05, aligned_err
    assert naive_err > 10 * aligned_err and naive_err > 0.3, (naive_err, aligned_err)


def renamed_architecture(src, dst, architecture: str) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=[architecture], model_type=architecture.lower())
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2",
                                    "deepseek_v3:deepseek_v32", "deepseek_v3:glm4_moe_lite", "glm4_moe", "gpt_oss",
                                    "llama4_text", "granitemoe:granitemoehybrid", "lfm2", "qwen3_next",
                                    "qwen3_next:qwen3_5_text", "qwen3_next:qwen3_5_moe_text",
                                    "mixtral:minimax_m2", "llama:ernie4_5_moe", "hunyuan_v1_dense:hunyuan_v1_moe",
                                    "glm4_moe:dots1", "glm4_moe:exaone_moe", "jetmoe", "lfm2:lfm2_moe", "cohere:cohere2_moe",
                                    "kimi_linear", "deepseek_v3:glm_moe_dsa", "glm4_moe:mimo_v2_flash", "glm4_moe:hy_v3",
                                    "glm4_moe:laguna", "glm4_moe:solar_open", "qwen3_moe:mellum", "qwen3_moe:flint",
                                    "granitemoe:granitemoe_swa", "bailing_hybrid", "deepseek_v3:dots3_note_text",
                                    "aria_text", "minimax_m3_vl_text", "deepseek_v2:minicpm3", "lfm2:lfm3", "nanochat",
                                    "llama:bitnet", "llama:diffllama", "eurobert", "eurobert:seqcls"])
def test_a_rotated_model_of_a_described_family_is_aligned_back(family, tmp_path):
    """Per-expert tensors, routers, shared experts and every other role are rotated as the family's table
    says (a NanoChat's norms have no gains to fold): merging a model with its own rotation gives the model
    back."""
    from safetensors.torch import load_file, save_file

    from test_architectures import build

    build(family, {"tie_word_embeddings": False}).save_pretrained(tmp_path / "A")
    config = json.loads((tmp_path / "A" / "config.json").read_text())
    state = {k: v.double() for k, v in load_file(tmp_path / "A" / "model.safetensors").items()}
    Q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    (tmp_path / "rotA").mkdir()
    save_file({k: v.float() for k, v in rotate(state, for_config(config), Q).items()},
              tmp_path / "rotA" / "model.safetensors")
    (tmp_path / "rotA" / "config.json").write_text(json.dumps(config))
    report = seme_merge(str(tmp_path / "A"), [str(tmp_path / "rotA")], tmp_path / "out")
    assert report["sources"][0]["applied"]
    merged, original = load_folder(tmp_path / "out"), load_folder(tmp_path / "A")
    assert merged.keys() == original.keys()
    for name, t in original.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-5, msg=name)


def test_ernie_moes_unloaded_mtp_layer_is_the_pivots(tmp_path):
    """Ernie 4.5 MoE's multi-token-prediction layer (model.mtp_*, which transformers does not load) has
    roles, so a rotated source is aligned rather than refused, and the merge keeps the pivot's layer."""
    from safetensors.torch import load_file, save_file

    from test_architectures import build

    build("llama:ernie4_5_moe", {"tie_word_embeddings": False}).save_pretrained(tmp_path / "A")
    config = json.loads((tmp_path / "A" / "config.json").read_text())
    state = load_file(tmp_path / "A" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    last = f"model.layers.{config['num_hidden_layers'] - 1}."
    for name in [n for n in state if n.startswith(last)]:
        state["model.mtp_block.0." + name[len(last):]] = state[name] + 0.01 * torch.randn(state[name].shape, generator=g)
    hidden = config["hidden_size"]
    state["model.mtp_emb_norm.0.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state["model.mtp_hidden_norm.0.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state["model.mtp_linear_proj.0.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=g)
    save_file(state, tmp_path / "A" / "model.safetensors", metadata={"format": "pt"})
    arch = for_config(config)
    mtp = [n for n in state if n.startswith("model.mtp_")]
    assert all(arch.role(n) is not None and arch.unloaded_module(n) == "model.mtp_" for n in mtp)
    Q, _ = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    (tmp_path / "rotA").mkdir()
    save_file({k: v.float() for k, v in rotate({k: v.double() for k, v in state.items()}, arch, Q).items()},
              tmp_path / "rotA" / "model.safetensors")
    (tmp_path / "rotA" / "config.json").write_text(json.dumps(config))
    report = seme_merge(str(tmp_path / "A"), [str(tmp_path / "rotA")], tmp_path / "out")
    assert report["sources"][0]["applied"]
    merged = load_folder(tmp_path / "out")
    assert merged.keys() == state.keys()
    for name, t in state.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-5, msg=name)


def test_models_without_a_role_table_are_not_rotated(trained, tmp_path, capsys):
    # names alone cannot say which norm gains each reader folds: a rotation would change the function
    paths, _, _, _ = trained
    pivot, source = (renamed_architecture(paths[k], tmp_path / k, "MysteryForCausalLM") for k in ("A", "rotB"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": pivot, "models": [{"model": source}]}))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("seme: warning: unknown architecture 'MysteryForCausalLM' (model_type 'mysteryforcausallm'); "
                      "tensor roles are inferred from tensor names")  # once, though both models are
    assert len(err) == 2 and "aligning MysteryForCausalLM models by rotation needs the architecture's role " \
        "table" in err[1] and err[1].endswith("set alignment: never to merge without it"), err
    assert not (tmp_path / "out").exists()
    same = renamed_architecture(paths["B"], tmp_path / "B", "MysteryForCausalLM")
    report = seme_merge(pivot, [same], tmp_path / "unrotated")
    assert not report["sources"][0]["applied"]


def test_tensors_the_role_table_lacks_are_not_rotated_silently(trained, tmp_path, capsys):
    # a tensor with no role would keep the source's coordinates while every other one turns
    from safetensors.torch import load_file, save_file

    paths, _, _, _ = trained
    extra = {}
    for k in ("A", "B", "rotB"):
        extra[k] = shutil.copytree(paths[k], tmp_path / k)
        state = load_file(extra[k] / "model.safetensors")
        state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, HIDDEN)
        save_file(state, extra[k] / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": str(extra["A"]),
                                      "models": [{"model": str(extra["rotB"])}]}))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("aligning llama models by rotation is not supported (its role table does not describe "
            "model.layers.0.mlp.extra_proj.weight: a rotation") in err, err
    assert not (tmp_path / "out").exists()
    report = seme_merge(str(extra["A"]), [str(extra["B"])], tmp_path / "unrotated")  # nothing to turn: merged
    assert not report["sources"][0]["applied"]


def test_layer_norm_families_merge_unrotated(tmp_path, capsys):
    # phi: LayerNorms (a rotation of the residual stream does not commute with them) and a head bias
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from conftest import build_family

    phi = build_family(str(tmp_path / "models"), "phi", n_experts=1)
    report = seme_merge(phi["base"], [phi["expert0"]], tmp_path / "out")
    assert not report["sources"][0]["applied"] and "already aligned" in report["sources"][0]["reason"]
    merged = load_folder(tmp_path / "out")
    assert merged.keys() == load_folder(phi["base"]).keys() and "lm_head.bias" in merged
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(torch.arange(8)[None]).logits).all()

    turned = shutil.copytree(phi["expert0"], tmp_path / "turned")  # its heads in other coordinates
    state = {k: v.double() for k, v in load_file(turned / "model.safetensors").items()}
    Q = random_orthogonal(HIDDEN, seed=4).double()
    save_file({k: v.float().contiguous() for k, v in rotate(state, for_config({"architectures": ["PhiForCausalLM"]}), Q).items()},
              turned / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": phi["base"], "models": [{"model": str(turned)}]}))
    assert main([str(recipe), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("seme: error: SeMe: aligning phi models by rotation is not supported (its norms are LayerNorms, which subtract "
                   "the mean: a rotation of the residual stream would change the function); set alignment: never to "
                   "merge without it"), err
    assert not (tmp_path / "refused").exists()
    report = seme_merge(phi["base"], [str(turned)], tmp_path / "never", alignment="never")
    assert report["sources"][0]["reason"] == "alignment: never"


@pytest.mark.parametrize("family", ["bert_mlm", "bert", "roberta", "distilbert", "deberta_v2", "deberta", "modernbert",
                                    "electra", "roberta_prelayernorm", "xlm_roberta_xl",
                                    "data2vec_text", "xmod", "megatron_bert", "bert_generation", "big_bird",
                                    "roformer", "rembert", "esm", "albert", "mpnet", "nomic_bert", "gte",
                                    "longformer", "layoutlm", "fnet", "convbert", "mobilebert"])
def test_an_encoder_is_refused_rotation_in_one_line(family, tmp_path, capsys):
    # post-LN encoders (a masked-LM head, or none: BERT's classifier): their sources are compared by the word
    # embeddings, and a turned one is refused as LayerNorm families are, no traceback (RemBERT's, whose token
    # tables lie outside the stream, in the same words before any comparison)
    from safetensors.torch import load_file, save_file

    from conftest import build_family

    models = build_family(str(tmp_path / "models"), family, n_experts=1)
    turned = shutil.copytree(models["expert0"], tmp_path / "turned")
    config = json.loads((turned / "config.json").read_text())
    state = {k: v.double() for k, v in load_file(turned / "model.safetensors").items()}
    Q = random_orthogonal(HIDDEN, seed=4).double()
    save_file({k: v.float().contiguous() for k, v in rotate(state, for_config(config), Q).items()},
              turned / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": models["base"],
                                      "models": [{"model": str(turned)}]}))
    assert main([str(recipe), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = "bert" if family == "bert_mlm" else family  # with its variant's config values, where one chose the roles
    # (MobileBERT's NoNorms are no norms: they scale the stream per channel)
    obstacle = "its residual stream is scaled channel by channel" if family == "mobilebert" else "its norms are LayerNorms"
    assert len(err) == 1 and err[0].startswith(f"seme: error: SeMe: aligning {name} ") and \
        f" models by rotation is not supported ({obstacle}" in err[0], err


def test_a_table_that_says_unrotatable_is_refused_rotation(tmp_path):
    # zamba2's shared attention reads the residual stream concatenated with the embeddings: no role turns it
    from safetensors.torch import load_file, save_file

    from test_architectures import build

    build("zamba2", {}).save_pretrained(tmp_path / "pivot")
    turned = shutil.copytree(tmp_path / "pivot", tmp_path / "turned")
    arch = for_config(json.loads((turned / "config.json").read_text()))
    state = {k: v.double() for k, v in load_file(turned / "model.safetensors").items()}
    save_file({k: v.float().contiguous() for k, v in rotate(state, arch, random_orthogonal(32, seed=4).double()).items()},
              turned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SemeError, match=r"^SeMe: aligning zamba2 models by rotation is not supported \(its shared "
                                        r"attention reads the residual stream concatenated with the token embeddings, "
                                        r"which no role expresses: a rotation"):
        seme_merge(str(tmp_path / "pivot"), [str(turned)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_variants_of_a_family_are_not_mixed(tmp_path):
    # falcon-7b's layout and falcon-40b's name other norms: refused before any tensor is read
    from test_architectures import build

    build("falcon", {}).save_pretrained(tmp_path / "7b")
    build("falcon", {"new_decoder_architecture": True}).save_pretrained(tmp_path / "40b")
    with pytest.raises(SemeError, match=r"^SeMe: 40b is a falcon \(new_decoder_architecture=true\) model but the "
                                        r"pivot is falcon; cross-architecture merges are not supported yet$"):
        seme_merge(str(tmp_path / "7b"), [str(tmp_path / "40b")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_zero_head_is_a_one_line_error(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    paths, _, _, _ = trained
    pivot = shutil.copytree(paths["A"], tmp_path / "A")
    weights = load_file(pivot / "model.safetensors")
    weights["model.norm.weight"].zero_()
    save_file(weights, pivot / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SemeError, match=r"the LM head of A, scaled by its final norm's gains, is zero"):
        seme_merge(str(pivot), [paths["B"]], tmp_path / "out")


@pytest.mark.parametrize("head", ["narrower", "integer"])
def test_a_head_the_bases_cannot_be_read_from_is_refused_before_any_tensor(trained, tmp_path, head):
    from safetensors.torch import load_file, save_file

    paths, _, _, _ = trained
    source = shutil.copytree(paths["B"], tmp_path / "B")
    weights = load_file(source / "model.safetensors")
    w = weights["lm_head.weight"]
    weights["lm_head.weight"] = w[:, :HIDDEN // 2].contiguous() if head == "narrower" else w.to(torch.int32)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    shape = [VOCAB, HIDDEN // 2] if head == "narrower" else [VOCAB, HIDDEN]
    with pytest.raises(SemeError, match=re.escape(
            f"SeMe: B has 'lm_head.weight' of {shape} {'F32' if head == 'narrower' else 'I32'} and 'model.norm.weight' "
            f"of [{HIDDEN}] F32; the semantic bases are read from a float LM head of [tokens, {HIDDEN}] and a final "
            f"norm of [{HIDDEN}]")):
        seme_merge(paths["A"], [str(source)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.seme-partial").exists()


def test_same_base_fine_tunes_skip_alignment(trained, tmp_path):
    paths, _, _, _ = trained
    report = seme_merge(paths["A"], [paths["B"]], tmp_path / "out")
    source = report["sources"][0]
    assert not source["applied"] and "already aligned" in source["reason"]
    assert source["distance_from_identity"] < 0.05
    tensor = report["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert tensor["selected_fraction"] == 1.0 and tensor["eta"] == [1.0]
    # One source, nothing trimmed: the merged update is the source's, so nothing drifts.
    assert report["tensors"]["model.layers.1.mlp.down_proj.weight"]["semantic_drift"] == [0.0]


def test_semantic_drift_is_reported_per_writing_tensor(trained, tmp_path):
    paths, _, _, _ = trained
    report = seme_merge(paths["A"], [paths["B"], paths["rotB"]], tmp_path / "out", select_topk=0.2)
    drift = report["tensors"]["model.layers.0.self_attn.o_proj.weight"]["semantic_drift"]
    assert len(drift) == 2 and all(0 < d < 0.7 for d in drift)
    assert "semantic_drift" not in report["tensors"]["model.layers.0.mlp.up_proj.weight"]  # reads, not writes



def test_a_resumed_merge_reports_the_tensors_merged_before_it_stopped(llama_family, tmp_path, monkeypatch):
    # The report held only the tensors merged by the run that published (under torchrun, rank 0's
    # share): their statistics are kept in the manifests with their shards.
    import seme.engine

    m = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": m["base"], "parameters": {"stabilize": True},
                                      "models": [{"model": m["expert0"]}, {"model": m["expert1"]}]}))
    assert main([str(recipe), str(tmp_path / "reference"), "--out-shard-size", "20KB"]) == 0
    real, merged = seme.engine.TorchEngine.merge, []

    def merge(self, task, out):
        merged.append(task.name)
        if len(merged) == 12:
            raise SemeError("stopped")
        return real(self, task, out)

    monkeypatch.setattr(seme.engine.TorchEngine, "merge", merge)
    assert main([str(recipe), str(tmp_path / "out"), "--out-shard-size", "20KB"]) == 2
    monkeypatch.setattr(seme.engine.TorchEngine, "merge", real)
    assert main([str(recipe), str(tmp_path / "out"), "--out-shard-size", "20KB", "--resume"]) == 0
    reference = (tmp_path / "reference" / "seme_report.json").read_text()
    assert (tmp_path / "out" / "seme_report.json").read_text() == reference
    assert len(json.loads(reference)["tensors"]) == 21


# --- §6 knowledge stabilisation ------------------------------------------------------------------

WRITERS = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in ("self_attn.o_proj", "mlp.down_proj")}


def test_stabilize_reweights_only_the_writers_when_on(llama_family, tmp_path):
    m = llama_family
    experts = [m["expert0"], m["expert1"], m["expert2"]]
    default = seme_merge(m["base"], experts, tmp_path / "default")
    seme_merge(m["base"], experts, tmp_path / "off", stabilize=False)
    report = seme_merge(m["base"], experts, tmp_path / "on", stabilize=True)
    assert not any("stabilization" in t for t in default["tensors"].values())
    plain, off, on = (load_folder(tmp_path / name) for name in ("default", "off", "on"))
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert all(torch.equal(plain[k], on[k]) for k in plain if k not in WRITERS)
    assert {k for k in WRITERS if not torch.equal(plain[k], on[k])}, "no writer was re-weighted"
    for name in WRITERS:
        stats = report["tensors"][name]["stabilization"]
        assert stats["drift_before"] == default["tensors"][name]["semantic_drift"]  # the plain SCE merge's
        assert stats["drift_after"] == report["tensors"][name]["semantic_drift"]
        assert torch.equal(plain[name], on[name]) == (stats["coefficients"] == [1.0, 1.0, 1.0])


@pytest.mark.parametrize("search_range", [4.0, 1.5])
def test_stabilized_coefficients_stay_in_range_and_never_drift_more(llama_family, tmp_path, search_range):
    m = llama_family
    report = seme_merge(m["base"], [m["expert0"], m["expert1"]], tmp_path / "out", select_topk=0.5,
                        stabilize=True, stabilize_range=search_range)
    for name in WRITERS:
        stats = report["tensors"][name]["stabilization"]
        assert all(1 / search_range - 1e-9 <= c <= search_range + 1e-9 for c in stats["coefficients"]), stats
        assert sum(stats["eta"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(stats["drift_after"]) <= sum(stats["drift_before"]) + 1e-6, stats  # the mean drift


def test_a_stabilized_merge_loads_and_generates(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    m = llama_family
    seme_merge(m["base"], [m["expert0"], m["expert1"]], tmp_path / "out", stabilize=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.isfinite(model(input_ids=out).logits).all()
    assert out.shape == (1, 8)


def test_one_source_has_nothing_to_stabilize(llama_family, tmp_path):
    m = llama_family
    report = seme_merge(m["base"], [m["expert0"]], tmp_path / "on", stabilize=True)
    seme_merge(m["base"], [m["expert0"]], tmp_path / "off")
    assert not any("stabilization" in t for t in report["tensors"].values())
    on, off = load_folder(tmp_path / "on"), load_folder(tmp_path / "off")
    assert all(torch.equal(on[k], off[k]) for k in on)


@pytest.mark.parametrize("params, expected", [
    ({"stabilize": "sometimes"}, "parameter 'stabilize' must be true or false, got 'sometimes'"),
    ({"stabilize": True, "stabilize_range": 0.5}, "parameter 'stabilize_range' must be >= 1.0, got 0.5"),
])
def test_a_bad_stabilize_parameter_is_a_one_line_error(llama_family, tmp_path, capsys, params, expected):
    m = llama_family
    recipe = {"merge_method": "seme", "base_model": m["base"], "parameters": params,
              "models": [{"model": m["expert0"]}, {"model": m["expert1"]}]}
    err = command_line_errors(recipe, tmp_path, capsys)
    assert len(err) == 1 and expected in err[0], err


# --- §4 depth ------------------------------------------------------------------------------------

def test_layer_map_follows_the_uniform_ratio():
    assert layer_map(2, 3) == [(0, 0, 0.0), (2, 2, 0.0)]
    assert layer_map(3, 4) == [(0, 0, 0.0), (1, 2, 0.5), (3, 3, 0.0)]
    assert layer_map(4, 2) == [(0, 0, 0.0), (0, 1, pytest.approx(1 / 3)), (0, 1, pytest.approx(2 / 3)), (1, 1, 0.0)]


def test_a_deeper_source_merges_by_interpolation(tmp_path):
    build_model(tmp_path / "pivot", layers=3, hidden=HIDDEN)
    deep = build_model(tmp_path / "deep", layers=4, hidden=HIDDEN, seed=5)
    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "deep")], tmp_path / "out", alignment="never")
    assert report["sources"][0]["layer_map"] == [[0, 0, 0.0], [1, 2, 0.5], [3, 3, 0.0]]
    out = load_folder(tmp_path / "out")
    name = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(out[name.format(1)], 0.5 * deep[name.format(1)] + 0.5 * deep[name.format(2)])
    torch.testing.assert_close(out[name.format(2)], deep[name.format(3)])
    assert json.load(open(tmp_path / "out" / "config.json"))["num_hidden_layers"] == 3


# --- vocabularies --------------------------------------------------------------------------------

# gemma 4 (tied, per-layer inputs): its per-layer token table's rows follow the tokens too, while its
# semantic bases come from its embedding alone
@pytest.mark.parametrize("family, token_tables", [
    ("llama", ("model.embed_tokens.weight", "lm_head.weight")),
    ("gemma4", ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight")),
])
def test_a_permuted_partly_different_vocabulary_keeps_token_meaning(tmp_path, family, token_tables):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from seme.io.model import ModelFolder
    from seme.semantic.pipeline import _head_names

    tied = family == "gemma4"
    pivot = build_model(tmp_path / "pivot", family, hidden=HIDDEN, vocab=VOCAB, tied=tied)
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(VOCAB, generator=g).tolist()
    src_words = [words[p] if p % 5 else f"new{p}" for p in perm]  # a fifth of the tokens differ
    source = build_model(tmp_path / "source", family, hidden=HIDDEN, vocab=VOCAB, tied=tied, base_state=pivot,
                         delta=0.05)
    state = load_folder(tmp_path / "source")
    assert set(token_tables) <= state.keys()
    for key in token_tables:
        state[key] = state[key][perm].contiguous()  # source id j holds the row of pivot token perm[j]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "source" / "model.safetensors"), metadata={"format": "pt"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(src_words)}, unk_token=src_words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "source")

    folder = ModelFolder.open(str(tmp_path / "source"))
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert _head_names(folder, for_config(folder.config)) == (head, "model.norm.weight")
    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "out", alignment="never")
    shared = sum(1 for p in perm if p % 5)
    assert report["sources"][0]["shared_tokens"] == shared
    out, original_source = load_folder(tmp_path / "out"), source
    for key in token_tables:
        for token_id in range(VOCAB):
            if token_id % 5:  # shared: the source's row for the same token lands on the pivot's id
                torch.testing.assert_close(out[key][token_id], original_source[key][token_id], msg=key)
            else:  # the source lacks this token: the pivot's row is kept
                torch.testing.assert_close(out[key][token_id], pivot[key][token_id], msg=key)


def test_a_token_table_of_the_first_tokens_follows_them(tmp_path):
    """Gemma 3n's per-layer token table holds rows for the first vocab_size_per_layer_input tokens only:
    under a permuted vocabulary a pivot token takes the source's row where both tables have one."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig, PreTrainedTokenizerFast

    rows, table = 100, "model.embed_tokens_per_layer.weight"
    config = Gemma3nTextConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, vocab_size_per_layer_input=rows,
                               hidden_size_per_layer_input=8, laurel_rank=4, num_kv_shared_layers=0,
                               layer_types=["sliding_attention", "full_attention"],
                               activation_sparsity_pattern=[0.0, 0.0])
    torch.manual_seed(0)
    save(Gemma3nForCausalLM(config), None, tmp_path / "pivot")
    pivot = load_folder(tmp_path / "pivot")
    g = torch.Generator().manual_seed(0)
    source = {k: v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=g) for k, v in pivot.items()}
    perm = torch.randperm(VOCAB, generator=g).tolist()  # source id j is pivot token perm[j]
    state = dict(source, **{"model.embed_tokens.weight": source["model.embed_tokens.weight"][perm].contiguous()})
    state[table] = torch.stack([source[table][p] if p < rows else torch.randn(source[table].shape[1:], generator=g)
                                for p in perm[:rows]])
    shutil.copytree(tmp_path / "pivot", tmp_path / "source")
    save_file(state, str(tmp_path / "source" / "model.safetensors"), metadata={"format": "pt"})
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    src_words = [words[p] if p % 5 else f"new{p}" for p in perm]  # a fifth of the tokens differ
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(src_words)}, unk_token=src_words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "source")

    seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "out", alignment="never")
    out, where = load_folder(tmp_path / "out"), {p: j for j, p in enumerate(perm)}
    assert out[table].shape == pivot[table].shape
    for token in range(rows):
        from_source = token % 5 and where[token] < rows
        torch.testing.assert_close(out[table][token], (source if from_source else pivot)[table][token], msg=str(token))


def move_to_tokenizer_config(folder, token: str) -> None:
    """`token` taken out of the folder's tokenizer.json and added by its tokenizer_config.json instead (its
    added_tokens_decoder), at the same id: transformers loads the same vocabulary."""
    data = json.loads((folder / "tokenizer.json").read_text())
    token_id = data["model"]["vocab"].pop(token)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.setdefault("added_tokens_decoder", {})[str(token_id)] = {
        "content": token, "special": False, "lstrip": False, "rstrip": False, "normalized": True, "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def test_a_token_the_tokenizer_config_adds_is_mapped(tmp_path):
    # SeMe reads each vocabulary as transformers loads it (seme.vocabulary.read), as tokenizer_source does: a token
    # that tokenizer_config.json adds is the model's too, and its rows follow it through a permuted vocabulary
    from safetensors.torch import save_file

    pivot = build_model(tmp_path / "pivot", "llama", hidden=HIDDEN, vocab=VOCAB)
    source = build_model(tmp_path / "source", "llama", hidden=HIDDEN, vocab=VOCAB, base_state=pivot, delta=0.05)
    added = VOCAB - 1
    perm = [*torch.randperm(added, generator=torch.Generator().manual_seed(0)).tolist(), added]
    save_file({k: v[perm].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v
               for k, v in source.items()}, str(tmp_path / "source" / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((tmp_path / "source" / "tokenizer.json").read_text())  # source id j is pivot token perm[j]
    words = {i: w for w, i in data["model"]["vocab"].items()}
    data["model"]["vocab"] = {words[p]: j for j, p in enumerate(perm)}
    (tmp_path / "source" / "tokenizer.json").write_text(json.dumps(data))
    for folder in ("pivot", "source"):
        move_to_tokenizer_config(tmp_path / folder, f"w{added - 3}")

    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "out", alignment="never")
    assert report["sources"][0]["shared_tokens"] == VOCAB
    out = load_folder(tmp_path / "out")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(out[key], source[key], msg=key)  # one source, select_topk 1: its rows


def test_a_padded_head_with_the_same_tokenizer_is_mapped(tmp_path):
    # the same tokenizer, the source's head padded to more rows: its tokens' rows are merged, its padding dropped
    # (it was refused as having no tokenizer.json to map its rows)
    pivot = build_model(tmp_path / "pivot", "llama", hidden=HIDDEN, vocab=VOCAB)
    source = build_model(tmp_path / "source", "llama", hidden=HIDDEN, vocab=VOCAB + 32, seed=1)
    save_tokenizer(tmp_path / "source", VOCAB)
    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "out", alignment="never")
    assert report["sources"][0]["shared_tokens"] == VOCAB
    out = load_folder(tmp_path / "out")
    assert out["lm_head.weight"].shape == pivot["lm_head.weight"].shape
    torch.testing.assert_close(out["lm_head.weight"], source["lm_head.weight"][:VOCAB])


@pytest.mark.parametrize("model", ["pivot", "source"])
def test_a_tokenizer_past_the_head_rows_is_refused_in_one_line(tmp_path, capsys, model):
    # a token without a row (a tokenizer that is not the model's) failed with an IndexError while aligning
    pivot = build_model(tmp_path / "pivot", "llama", hidden=HIDDEN, vocab=VOCAB)
    build_model(tmp_path / "source", "llama", hidden=HIDDEN, vocab=VOCAB, base_state=pivot, delta=0.05)
    save_tokenizer(tmp_path / "source", VOCAB)
    save_tokenizer(tmp_path / model, VOCAB + 4)
    data = json.loads((tmp_path / "source" / "tokenizer.json").read_text())  # the source's vocabulary differs
    data["model"]["vocab"] = {w: len(data["model"]["vocab"]) - 1 - i for w, i in data["model"]["vocab"].items()}
    (tmp_path / "source" / "tokenizer.json").write_text(json.dumps(data))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": str(tmp_path / "pivot"),
                                      "models": [{"model": str(tmp_path / "source")}]}))
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    first = "w125" if model == "pivot" else "w0"  # the source's ids are reversed
    assert capsys.readouterr().err.strip().splitlines() == [
        f"seme: error: SeMe: the tokenizer of {model} has 4 tokens past its LM head's {VOCAB} rows ('{first}' is "
        f"{VOCAB}): it is not the model's vocabulary"]
    assert not (tmp_path / "out").exists()


def test_too_few_shared_tokens_to_align_are_refused(tmp_path, capsys):
    # the alignment map sums a rank-one term per shared token: fewer than the hidden size leave it undetermined
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pivot = build_model(tmp_path / "pivot", "llama", hidden=HIDDEN, vocab=VOCAB)
    build_model(tmp_path / "source", "llama", hidden=HIDDEN, vocab=VOCAB, base_state=pivot, delta=0.05)
    words = [f"w{i}" if i < HIDDEN - 1 else f"other{i}" for i in range(VOCAB)]  # w0 .. w30 shared
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "source")
    recipe = {"merge_method": "seme", "base_model": str(tmp_path / "pivot"),
              "models": [{"model": str(tmp_path / "source")}]}
    assert command_line_errors(recipe, tmp_path, capsys) == [
        f"seme: error: SeMe: source shares {HIDDEN - 1} tokens with the pivot, fewer than the hidden size {HIDDEN}: "
        f"too few to determine the alignment; set alignment: never to merge without it"]
    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "never", alignment="never")
    assert report["sources"][0]["shared_tokens"] == HIDDEN - 1


TEXTS = ["the cat sat on the mat", "été naïve café crème brûlée", "日本語のテキストです", "line one\nline two\tand tabs",
         "Ġ is a Maltese letter", "the quick brown fox jumps over the lazy dog"]


def byte_level_tokenizer(folder, size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2's, Llama 3's, Qwen's kind) trained on TEXTS, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 50, trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(folder, name))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def sentencepiece_only(folder, size: int) -> None:
    """A SentencePiece BPE model with byte fallback (Llama 2's, Mistral's kind) trained on TEXTS, as the folder's
    only vocabulary: tokenizer.model, no tokenizer.json."""
    import io

    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 50), model_writer=model, vocab_size=size,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(folder, name))
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))


def test_a_byte_level_and_a_sentencepiece_vocabulary_share_the_tokens_that_spell_the_same_text(tmp_path):
    # a byte-level BPE pivot (of fewer tokens than rows: padding) and a source whose only vocabulary is a
    # SentencePiece tokenizer.model: tokens are the same where they spell the same text, as each tokenizer's own
    # decoder says ('Ġcat' and '▁cat', 'Ã©' and 'é', 'Ċ' and '<0x0A>'); the same string is not the same token where
    # it spells other text (byte-level 'Ġ' is a space, SentencePiece's a letter). The strings alone shared ~a quarter.
    import unicodedata

    from transformers import AutoTokenizer

    from seme.io.model import ModelFolder
    from seme.semantic import vocab
    from seme.vocabulary import read

    pivot = build_model(tmp_path / "pivot", "llama", hidden=HIDDEN, vocab=384)
    byte_level_tokenizer(tmp_path / "pivot", 360)
    build_model(tmp_path / "source", "llama", hidden=HIDDEN, vocab=400, seed=1)
    sentencepiece_only(tmp_path / "source", 400)

    def texts(folder) -> dict[int, str]:
        """Each token's text by its tokenizer's own decoder (after a letter: SentencePiece drops a leading space),
        where it is whole characters."""
        tokenizer = AutoTokenizer.from_pretrained(folder)
        out = {}
        for token, i in tokenizer.get_vocab().items():
            text = tokenizer.convert_tokens_to_string(["a", token])[1:] if i not in tokenizer.added_tokens_decoder \
                else token
            if "\ufffd" not in text:
                out[i] = unicodedata.normalize("NFKC", text)
        return out

    pivot_texts, source_texts = texts(tmp_path / "pivot"), texts(tmp_path / "source")
    token_map = vocab.token_map(read(ModelFolder(str(tmp_path / "pivot")), "SeMe"),
                                read(ModelFolder(str(tmp_path / "source")), "SeMe"), 384)
    assert token_map[360:] == [-1] * 24  # padding rows
    for i, text in pivot_texts.items():
        if text in source_texts.values():
            assert source_texts[token_map[i]] == text, (i, text)
        else:
            assert token_map[i] < 0, (i, text)
    pivot_ids = AutoTokenizer.from_pretrained(tmp_path / "pivot").get_vocab()
    source_ids = AutoTokenizer.from_pretrained(tmp_path / "source").get_vocab()
    assert token_map[pivot_ids["Ã"]] == source_ids["<0xC3>"]  # a piece of a character: the same byte
    shared = sum(j >= 0 for j in token_map)
    assert shared > 0.8 * len(pivot_texts)

    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "out", alignment="never")
    assert report["sources"][0]["shared_tokens"] == shared
    out, source = load_folder(tmp_path / "out"), load_folder(tmp_path / "source")
    mapped = [i for i, j in enumerate(token_map) if j >= 0]
    torch.testing.assert_close(out["lm_head.weight"][mapped], source["lm_head.weight"][[token_map[i] for i in mapped]])
    torch.testing.assert_close(out["lm_head.weight"][360:], pivot["lm_head.weight"][360:])


def test_a_tokenizer_that_is_its_own_code_gives_no_vocabulary_to_map_by(tmp_path, capsys):
    # seme never runs a model's code (tokenizer_config.json's auto_map): as without tokenizer files, the rows are
    # taken as the same tokens where their counts agree, and refused where they do not
    pivot = build_model(tmp_path / "pivot", "llama", hidden=HIDDEN, vocab=VOCAB)
    for folder, rows in (("source", VOCAB), ("longer", VOCAB + 32)):
        build_model(tmp_path / folder, "llama", hidden=HIDDEN, vocab=rows, base_state=pivot if rows == VOCAB else None,
                    delta=0.05)
        settings = json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        settings.update(tokenizer_class="OwnTokenizer",
                        auto_map={"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]})
        (tmp_path / folder / "tokenizer_config.json").write_text(json.dumps(settings))
    report = seme_merge(str(tmp_path / "pivot"), [str(tmp_path / "source")], tmp_path / "out", alignment="never")
    assert report["sources"][0]["shared_tokens"] == VOCAB
    recipe = {"merge_method": "seme", "base_model": str(tmp_path / "pivot"),
              "models": [{"model": str(tmp_path / "longer")}]}
    assert command_line_errors(recipe, tmp_path, capsys) == [
        f"seme: error: SeMe: longer has {VOCAB + 32} token rows, the pivot {VOCAB}, and no vocabulary to map them by: "
        f"longer has a tokenizer that is its own code, which seme never runs"]
