"""Image encoders (ViT, DeiT) and image-text models (CLIP, SigLIP and SigLIP 2): their role tables, their parts
as `modules:` recipes name them (a two-tower model's text_model and vision_model), and merges of them.
"""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import transformers
import yaml

import seme
import tiny_models
from conftest import load_folder
from seme.architectures import config_entry, for_config, modules
from seme.errors import SemeError

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
            max_position_embeddings=16, eos_token_id=2)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=4)  # another width than the text tower's, so that a role on the wrong tower shows
SIGLIP2_VISION = dict(VISION, num_patches=16)
del SIGLIP2_VISION["image_size"]
TWO_TOWERS = dict(text_config=TEXT, vision_config=VISION)
SIGLIP = dict(text_config=dict(TEXT, projection_size=VISION["hidden_size"]), vision_config=VISION)  # the text head
# maps into the image embeddings' space
FAMILIES = {  # "table:what" keys, as in test_architectures
    "vit": ("ViTConfig", "ViTForImageClassification", VISION),
    "vit:model": ("ViTConfig", "ViTModel", VISION),  # saved without 'vit.', with the pooler
    "vit:mim": ("ViTConfig", "ViTForMaskedImageModeling", dict(VISION, encoder_stride=4)),  # mask_token, a 1x1 conv decoder
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", VISION),
    "deit:model": ("DeiTConfig", "DeiTModel", VISION),
    "deit:mim": ("DeiTConfig", "DeiTForMaskedImageModeling", dict(VISION, encoder_stride=4)),
    "clip": ("CLIPConfig", "CLIPModel", dict(TWO_TOWERS, projection_dim=20)),
    "clip:vision": ("CLIPVisionConfig", "CLIPVisionModel", VISION),  # saved without 'vision_model.'
    "clip:vision-projection": ("CLIPVisionConfig", "CLIPVisionModelWithProjection", dict(VISION, projection_dim=20)),
    "clip:text": ("CLIPTextConfig", "CLIPTextModel", TEXT),  # saved without 'text_model.'
    "clip:text-projection": ("CLIPTextConfig", "CLIPTextModelWithProjection", dict(TEXT, projection_dim=20)),
    "clip:classifier": ("CLIPConfig", "CLIPForImageClassification", TWO_TOWERS),  # depth in vision_config only
    "siglip": ("SiglipConfig", "SiglipModel", SIGLIP),
    "siglip:vision": ("SiglipVisionConfig", "SiglipVisionModel", VISION),
    "siglip:vision-headless": ("SiglipVisionConfig", "SiglipVisionModel", dict(VISION, vision_use_head=False)),
    "siglip:text": ("SiglipTextConfig", "SiglipTextModel", dict(TEXT, projection_size=24)),
    "siglip:classifier": ("SiglipConfig", "SiglipForImageClassification", SIGLIP),
    "siglip:siglip2": ("Siglip2Config", "Siglip2Model", dict(SIGLIP, vision_config=SIGLIP2_VISION)),
}
LAYER = re.compile(r"\.(?:layers|layer)\.(\d+)\.")
VECTORS = {"norm", "norm_bias", "final_norm", "final_norm_bias", "write_bias"}


def build(key: str, seed: int = 0, **extra):
    return tiny_models.build(FAMILIES, key, seed, **extra)


def run(model):
    """The model on random images and / or token ids, as its class takes them."""
    kind = type(model).__name__
    config = model.config
    vision = getattr(config, "vision_config", config)
    inputs = {}
    if "Text" not in kind:
        if kind.startswith("Siglip2"):  # patches flattened, with their grid
            inputs.update(pixel_values=torch.randn(2, vision.num_patches, 3 * vision.patch_size ** 2),
                          pixel_attention_mask=torch.ones(2, vision.num_patches, dtype=torch.long),
                          spatial_shapes=torch.tensor([[4, 4], [4, 4]]))
        else:
            inputs["pixel_values"] = torch.randn(2, 3, vision.image_size, vision.image_size)
        if "MaskedImageModeling" in kind:
            inputs["bool_masked_pos"] = torch.rand(2, (vision.image_size // vision.patch_size) ** 2) < 0.5
    if "Text" in kind or kind.endswith(("CLIPModel", "SiglipModel", "Siglip2Model")):
        inputs["input_ids"] = torch.tensor([[5, 9, 2, 7, 11, 3], [4, 8, 6, 2, 10, 12]])
    return model(**inputs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """key -> (model, config.json, {saved tensor name: shape}); the saved names' in-memory ones in `in_memory`."""
    get = tiny_models.saved_once(tmp_path_factory, build)

    def shapes(key):
        model, config, state = get(key)
        in_memory.setdefault(model, {n: in_memory_name(model, t) for n, t in state.items()})
        return model, config, {k: tuple(v.shape) for k, v in state.items()}

    return shapes


in_memory = {}  # per model, each saved tensor's name in memory: transformers 5 renames ViT's (vit.layers.0.mlp.fc1)


def in_memory_name(model, tensor) -> str:
    """The name in memory of a saved tensor: the one parameter or buffer of its values (build makes them all
    differ)."""
    found = [n for n, t in model.state_dict().items() if t.shape == tensor.shape and torch.equal(t, tensor)]
    assert len(found) == 1, found
    return found[0]


def part_settings(config: dict, part: str) -> dict:
    """The settings of a tower: its sub-config in a two-tower model's config (its table's depth key says
    which), else the config itself."""
    declared = for_config(config).depth_key(part)
    found = declared and config_entry(config, declared)
    return found[0] if found else config


@pytest.mark.parametrize("key", FAMILIES)
def test_checkpoint_roles_and_parts(saved, key):
    model, config, shapes = saved(key)
    arch = for_config(config)
    assert arch.name == key.split(":")[0] and not arch.inferred
    parts = {p.name for p in arch.parts}
    for name, shape in shapes.items():
        r = arch.role(name)
        assert r is not None, name
        m = LAYER.search(name)
        assert r.layer == (int(m.group(1)) if m else None), name
        part = arch.part_of(name)
        assert part in parts, name
        hidden = part_settings(config, part)["hidden_size"]
        if r.role == "read":
            assert shape[-1] == hidden, name
            if r.norm is not None:
                assert arch.role(r.norm).role in ("norm", "final_norm"), name
                assert r.norm in shapes and arch.part_of(r.norm) == part, name
        elif r.role == "write":  # a patch embedding's output channels too: [d, channels, patch, patch]
            assert shape[0] == hidden, name
        elif r.role == "embedding":
            assert shape == (part_settings(config, part)["vocab_size"], hidden), name
        elif r.role in ("position_embedding", "stream_vector"):  # ViT's [1, positions, d], class tokens [1, 1, d]
            assert shape[-1] == hidden, name
        elif r.role in VECTORS:
            assert shape == (hidden,), name
        else:
            assert r.role in ("inner", "buffer"), name
    # Every required template at every layer of its tower, in the towers the checkpoint has.
    present = {arch.part_of(n) for n in shapes}
    for template, spec in arch.tensors.items():
        part = arch.part_of(template)
        if spec.optional or part not in present:
            continue
        depth = part_settings(config, part)["num_hidden_layers"]
        for i in range(depth) if "{layer}" in template else [None]:
            name = arch.layer_name(template, i) if i is not None else template
            assert name in shapes or name.removeprefix(arch.base_prefix) in shapes, name
        if "{layer}" in template:
            assert arch.layer_name(template, depth) not in shapes, template
    assert "its norms are LayerNorms, which subtract the mean" in arch.rotation_obstacles()


@pytest.mark.parametrize("key, prefix", [("clip:vision", "vision_model."), ("clip:text", "text_model."),
                                         ("siglip:vision", "vision_model."), ("siglip:text", "text_model.")])
def test_a_tower_saved_under_its_prefix(saved, key, prefix):
    # transformers 4 saved CLIPVisionModel's (and its kin's) tensors under their transformer's attribute: the
    # same roles, in the same tower
    _, config, shapes = saved(key)
    arch = for_config(config)
    for name in shapes:
        bare, prefixed = arch.role(name), arch.role(prefix + name)
        assert (prefixed.role, prefixed.layer, prefixed.norm) == (bare.role, bare.layer, bare.norm and prefix + bare.norm)
        assert arch.part_of(prefix + name) == arch.part_of(name) == prefix.rstrip(".")


def test_a_tower_is_named_by_its_prefix_or_its_alias():
    assert modules.canonical("vision_tower", {"text_model": 0, "vision_model": 1}) == "vision_model"
    assert modules.canonical("vision_model", {"text_decoder": 0, "vision_tower": 1}) == "vision_tower"
    assert modules.canonical("text_decoder", {"text_model": 0, "vision_model": 1}) is None
    assert modules.canonical("vision_model", {"vision_model": 0}) == modules.canonical("default", {"vision_model": 0})


def mismatched_reads(model, arch, shapes) -> list[str]:
    """Run the model: the reads whose input is not their norm's output (MultiheadAttention's: its key and value;
    a pooled read's: its rows, or their mean over the tokens), or, for a read without a norm, not the stream its
    tower's encoder ends with."""
    named = dict(model.named_modules())
    inputs, outputs = {}, {}

    def hook(name):
        def record(_, args, output):
            inputs[name], outputs[name] = args, output
        return record

    def module(tensor_name):
        return in_memory[model][tensor_name].rsplit(".", 1)[0]

    reads = [n for n in shapes if arch.role(n).role == "read"]
    norms = {n: arch.role(n).norm for n in reads if arch.role(n).norm}
    encoders = [m for m in named if m.split(".")[-1] == "encoder"]
    watched = {module(n) for n in reads} | set(map(module, norms.values())) | set(encoders)
    handles = [named[m].register_forward_hook(hook(m)) for m in watched]
    with torch.no_grad():
        run(model)
    for h in handles:
        h.remove()
    assert reads
    wrong = []
    for name in reads:
        streams = [outputs[module(norms[name])]] if name in norms else [outputs[m][0] for m in encoders]
        if not any(pooled_from(x, y) for x in inputs[module(name)] for y in streams):
            wrong.append(name)
    return wrong


def pooled_from(x, y) -> bool:
    """Whether x is y, or y's tokens pooled: some of its rows (a class token), or their mean (with or without
    the class token)."""
    if not isinstance(x, torch.Tensor) or x.shape[-1] != y.shape[-1]:
        return False
    if x.shape == y.shape:
        return torch.allclose(x, y, atol=1e-6)
    if any(x.shape == m.shape and torch.allclose(x, m, atol=1e-6) for m in (y.mean(1), y[:, 1:].mean(1))):
        return True
    distances = torch.cdist(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]),
                            compute_mode="donot_use_mm_for_euclid_dist")
    return bool((distances.min(dim=1).values < 1e-5).all())


@pytest.mark.parametrize("key", FAMILIES)
def test_norm_feeds_read(saved, key):
    model, config, shapes = saved(key)
    assert mismatched_reads(model, for_config(config), shapes) == []


@pytest.mark.parametrize("key, read, norm", [
    ("clip", "visual_projection.weight", "vision_model.encoder.layers.2.layer_norm2.weight"),
    ("siglip", "vision_model.head.attention.in_proj_weight", "vision_model.head.layernorm.weight"),
    ("vit", "vit.encoder.layer.1.intermediate.dense.weight", "vit.encoder.layer.1.layernorm_before.weight"),
])
def test_a_wrong_norm_is_caught(saved, key, read, norm):
    # the check above would pass a table whose read names another norm than the one that feeds it
    model, config, shapes = saved(key)
    arch = for_config(config)
    layered = arch.role(read)
    template = read if layered.layer is None else layered.template
    norm_template = norm if layered.layer is None else norm.replace(f".{layered.layer}.", ".{layer}.")
    wrong = dataclasses.replace(arch, tensors={**arch.tensors,
                                               template: dataclasses.replace(arch.tensors[template], norm=norm_template)})
    assert mismatched_reads(model, wrong, shapes) == [n for n in shapes if wrong.role(n).template == template]


def family(tmp_path, key: str, n: int = 3, **extra) -> list[str]:
    return [tiny_models.save(build(key, seed=i, **extra), tmp_path / f"{key.replace(':', '-')}{i}") for i in range(n)]


def merge(recipe: dict, out) -> dict:
    seme.merge(yaml.safe_dump(recipe), str(out), progress=False)
    return load_folder(out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_merge_of_three_clips_reloads_and_runs(method, tmp_path):
    paths = family(tmp_path, "clip")
    recipe = {"merge_method": method, "dtype": "float32", "base_model": paths[0],
              "parameters": {"normalize": True} if method == "ties" else {},
              "models": [{"model": p, "parameters": {"weight": 0.5, **({"density": 0.5} if method == "ties" else {})}}
                         for p in paths[1:]]}
    ours = merge(recipe, tmp_path / "merged")
    src = [load_folder(p) for p in paths]
    assert sorted(ours) == sorted(src[0])
    if method == "task_arithmetic":
        for name, tensor in ours.items():
            expected = src[0][name] + 0.5 * (src[1][name] - src[0][name]) + 0.5 * (src[2][name] - src[0][name])
            torch.testing.assert_close(tensor, expected, msg=name)
    merged = transformers.CLIPModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.isfinite(run(merged).logits_per_image).all()


@pytest.mark.parametrize("key, model_cls", [("clip", "CLIPModel"), ("siglip", "SiglipModel")])
@pytest.mark.parametrize("name", ["vision_model", "vision_tower"])
def test_modules_slice_the_vision_tower(tmp_path, key, model_cls, name):
    """The vision tower sliced (one layer dropped, one repeated), the text tower merged whole: the vision depth in
    vision_config follows, the text depth stays; the tower's embeddings come from the first slice's model, its
    final norm and head from the last's; the output loads and runs."""
    paths = family(tmp_path, key)
    whole = {"models": [{"model": p, "parameters": {"weight": 1 / 3}} for p in paths]}
    vision = {"slices": [{"sources": [{"model": paths[0], "layer_range": [0, 2]}]},
                         {"sources": [{"model": paths[1], "layer_range": [1, 3]}]}]}
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
              "modules": {"text_model": whole, name: vision}}
    ours = merge(recipe, tmp_path / "merged")
    src = [load_folder(p) for p in paths]
    config = json.load(open(tmp_path / "merged" / "config.json"))
    assert (config["vision_config"]["num_hidden_layers"], config["text_config"]["num_hidden_layers"]) == (4, 2)
    expected = {"vision_model.embeddings.patch_embedding.weight": src[0]["vision_model.embeddings.patch_embedding.weight"],
                "vision_model.embeddings.position_embedding.weight": src[0]["vision_model.embeddings.position_embedding.weight"],
                "vision_model.encoder.layers.1.mlp.fc1.weight": src[0]["vision_model.encoder.layers.1.mlp.fc1.weight"],
                "vision_model.encoder.layers.2.mlp.fc1.weight": src[1]["vision_model.encoder.layers.1.mlp.fc1.weight"],
                "vision_model.encoder.layers.3.self_attn.q_proj.bias": src[1]["vision_model.encoder.layers.2.self_attn.q_proj.bias"],
                "vision_model.post_layernorm.weight": src[1]["vision_model.post_layernorm.weight"]}
    if key == "clip":
        expected["vision_model.embeddings.class_embedding"] = src[0]["vision_model.embeddings.class_embedding"]
        expected["vision_model.pre_layrnorm.bias"] = src[0]["vision_model.pre_layrnorm.bias"]
        expected["visual_projection.weight"] = src[1]["visual_projection.weight"]
    else:
        expected["vision_model.head.probe"] = src[1]["vision_model.head.probe"]
    for tensor_name, tensor in expected.items():
        assert torch.equal(ours[tensor_name], tensor), tensor_name
    text = "text_model.encoder.layers.1.mlp.fc2.weight"
    torch.testing.assert_close(ours[text], sum(s[text] for s in src) / 3)
    assert not any(n.startswith("vision_model.encoder.layers.4.") for n in ours)
    merged = getattr(transformers, model_cls).from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vision_config.num_hidden_layers == 4
    with torch.no_grad():
        run(merged)


def test_slices_of_a_vit_take_its_embeddings_from_the_first(tmp_path):
    # one tower, sliced with plain slices: its patch embedding and class token lead its layers, as its positions do
    paths = family(tmp_path, "vit", n=2)
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": paths[0], "layer_range": [0, 2]}]},
                         {"sources": [{"model": paths[1], "layer_range": [1, 3]}]}]}
    ours = merge(recipe, tmp_path / "merged")
    src = [load_folder(p) for p in paths]
    for name in ("vit.embeddings.cls_token", "vit.embeddings.patch_embeddings.projection.weight",
                 "vit.embeddings.position_embeddings"):
        assert torch.equal(ours[name], src[0][name]), name
    for name in ("vit.layernorm.weight", "classifier.weight"):
        assert torch.equal(ours[name], src[1][name]), name
    assert json.load(open(tmp_path / "merged" / "config.json"))["num_hidden_layers"] == 4
    with torch.no_grad():
        run(transformers.ViTForImageClassification.from_pretrained(tmp_path / "merged").eval())


def test_a_clip_classifier_slices_its_vision_config(tmp_path):
    # CLIPForImageClassification's config holds its depth in vision_config alone
    paths = family(tmp_path, "clip:classifier", n=2)
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": paths[0], "layer_range": [0, 3]}]},
                         {"sources": [{"model": paths[1], "layer_range": [2, 3]}]}]}
    merge(recipe, tmp_path / "merged")
    config = json.load(open(tmp_path / "merged" / "config.json"))
    assert "num_hidden_layers" not in config and config["vision_config"]["num_hidden_layers"] == 4
    with torch.no_grad():
        run(transformers.CLIPForImageClassification.from_pretrained(tmp_path / "merged").eval())


@pytest.mark.parametrize("key", ["clip", "siglip:vision", "vit"])
def test_seme_refuses_a_vision_encoder(key, tmp_path):
    paths = family(tmp_path, key, n=2)
    recipe = {"merge_method": "seme", "base_model": paths[0], "models": [{"model": p} for p in paths]}
    with pytest.raises(SemeError, match=rf"^SeMe: .* is no decoder-only language model with a causal LM head "
                                        rf"\({key.split(':')[0]}, of modules [^\n]*$"):
        seme.merge(yaml.safe_dump(recipe), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
