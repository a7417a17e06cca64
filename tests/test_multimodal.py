"""Models of several layer stacks (a language decoder and a vision tower: Llava, Qwen2-VL, Gemma 3)
are merged whole, tensor by tensor, with gradients running over each stack's own layers."""
from __future__ import annotations

import pytest
import torch
import yaml

import seme
from conftest import load_folder
from seme.merge import main


def build_llava(path, seed: int, vision_layers: int = 3):
    import transformers

    config = transformers.LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=vision_layers, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=16),
        image_token_index=60, vision_feature_layer=-2)
    torch.manual_seed(seed)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return [build_llava(root / name, seed) for seed, name in enumerate(("a", "b"))]


def recipe(models):
    return {"merge_method": "linear", "dtype": "float32", "models": [{"model": m} for m in models],
            "parameters": {"weight": 1.0}, }


def test_a_multimodal_model_merges_whole_with_gradients_per_stack(llavas, tmp_path):
    import transformers

    a, b = llavas
    # a's weight runs 1 -> 0 over each stack, b's is 1 - that: each stack's last layer is b's
    seme.merge({**recipe(llavas), "models": [{"model": a, "parameters": {"weight": [1.0, 0.0]}},
                                              {"model": b, "parameters": {"weight": [0.0, 1.0]}}]},
               str(tmp_path / "gradient"), progress=False)
    gradient, wa, wb = (load_folder(p) for p in (tmp_path / "gradient", a, b))
    assert gradient.keys() == wa.keys()
    for name in wa:
        if "vision" in name and ".layers.1." in name:  # the vision tower's middle layer: t = 1/2
            torch.testing.assert_close(gradient[name], (wa[name] + wb[name]) / 2, msg=name)
            continue
        last = (".layers.2." in name and "vision" in name) or (".layers.1." in name and "language_model" in name)
        assert torch.equal(gradient[name], wb[name] if last else wa[name]), name
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "gradient")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.parametrize("case, message", [
    ("slices", "has several layer stacks (language_model.model.layers.* (2 layers), vision_tower.encoder.layers.* "
               "(3 layers)), which one layer_range cannot select: merge it whole with 'models:'"),
    ("seme", "SeMe aligns language models of one stack"),
    ("depths", "models merged whole must have the same layers"),
])
def test_what_a_multimodal_model_cannot_do_is_a_one_line_error(llavas, tmp_path, capsys, case, message):
    a, b = llavas
    if case == "slices":
        r = {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}]}
    elif case == "seme":
        r = {"merge_method": "seme", "base_model": a, "models": [{"model": b}]}
    else:
        r = recipe([a, build_llava(tmp_path / "deep", 3, vision_layers=4)])
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(r))
    capsys.readouterr()
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("seme: warning")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
