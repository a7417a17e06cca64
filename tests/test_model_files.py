"""The files that travel with a merged model: its tokenizer's (every vocabulary file transformers may
read, chat templates) from the tokenizer's model, its processor's (image processor, feature extractor)
from the model whose architecture it takes, so that AutoTokenizer and AutoProcessor load the output
as they load that model."""
from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import yaml

import seme
from seme.io.model import CHAT_TEMPLATES, PROCESSOR_CHAT_TEMPLATE, PROCESSOR_FILES, TOKENIZER_FILES, ModelFolder
from seme.merge import main

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CONVERSATION = [{"role": "user", "content": "w1 w2"}]


def tokenizer_classes():
    """Every tokenizer class transformers ships (those whose module imports here)."""
    import transformers

    root = os.path.dirname(transformers.__file__)
    modules = [f"transformers.{n[:-3]}" for n in os.listdir(root) if n.startswith("tokenization_") and n.endswith(".py")]
    for family in os.listdir(os.path.join(root, "models")):
        folder = os.path.join(root, "models", family)
        if os.path.isdir(folder):
            modules += [f"transformers.models.{family}.{n[:-3]}" for n in os.listdir(folder)
                        if n.startswith("tokenization_") and n.endswith(".py")]
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module that needs a package not installed here
                continue
            found |= {c for c in vars(module).values() if inspect.isclass(c) and isinstance(getattr(c, "vocab_files_names", None), dict)}
    return found


def test_the_tokenizer_files_are_those_transformers_reads():
    """Every vocabulary file a transformers tokenizer class names, every file from_pretrained reads
    for any tokenizer and the vocabularies it finds by name are tokenizer files."""
    from transformers import tokenization_utils_base as base
    from transformers import tokenization_utils_tokenizers as backend
    from transformers.integrations.mistral.constants import TEKKEN_VOCAB_FILE

    classes = tokenizer_classes()
    assert len(classes) > 90  # the modules did import (transformers 5.23 has 103 such classes)
    named = {file for c in classes for file in c.vocab_files_names.values()}
    every_tokenizer = {base.ADDED_TOKENS_FILE, base.SPECIAL_TOKENS_MAP_FILE, base.TOKENIZER_CONFIG_FILE,
                       base.FULL_TOKENIZER_FILE, base.CHAT_TEMPLATE_FILE}
    assert named | every_tokenizer | {TEKKEN_VOCAB_FILE, backend.TIKTOKEN_LEGACY_NAME} <= TOKENIZER_FILES


def test_the_processor_files_are_those_transformers_reads():
    from transformers import utils

    assert {utils.FEATURE_EXTRACTOR_NAME, utils.IMAGE_PROCESSOR_NAME, utils.VIDEO_PROCESSOR_NAME,
            utils.AUDIO_TOKENIZER_NAME, utils.PROCESSOR_NAME} == set(PROCESSOR_FILES)
    assert (utils.LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE, utils.CHAT_TEMPLATE_DIR) == (PROCESSOR_CHAT_TEMPLATE, CHAT_TEMPLATES)


def with_files(src, dst, files: dict) -> str:
    """A copy of model folder `src` with `files` (path -> text) added."""
    shutil.copytree(src, dst)
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            f.write(text)
    return str(dst)


def test_a_models_tokenizer_files_by_rule(llama_family, tmp_path):
    """Vocabularies by name (Marian's, Mistral's versioned), the versioned fast tokenizers that
    tokenizer_config.json lists (by name only), named chat templates and a processor's template."""
    folder = with_files(llama_family["base"], tmp_path / "m", {
        "source.spm": "", "target.spm": "", "target_vocab.json": "{}", "tokenizer.model.v3": "", "tekken.json": "{}",
        "tokenizer.4.0.json": "{}", "tokenizer.9.json": "{}", "chat_template.json": "{}", "preprocessor_config.json": "{}",
        f"{CHAT_TEMPLATES}/tool_use.jinja": TEMPLATE, f"{CHAT_TEMPLATES}/notes.txt": "", "tokenizer_config.json":
            json.dumps({"fast_tokenizer_files": ["tokenizer.4.0.json", "../config.json", "tokenizer.5.json"]})})
    assert ModelFolder(folder).tokenizer_files() == [
        "chat_template.json", "source.spm", "target.spm", "target_vocab.json", "tekken.json", "tokenizer.json",
        "tokenizer.model.v3", "tokenizer_config.json", "tokenizer.4.0.json", f"{CHAT_TEMPLATES}/tool_use.jinja"]
    assert ModelFolder(folder).processor_files() == ["preprocessor_config.json"]


def spiece_model() -> bytes:
    """A small SentencePiece (unigram) model, as T5's spiece.model."""
    spm = pytest.importorskip("sentencepiece")
    words = [f"w{i}" for i in range(40)] + ["hello", "world", "merge", "models"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(words[i:i + 7]) for i in range(len(words))] * 20),
                                   model_writer=model, vocab_size=60, model_type="unigram", minloglevel=2,
                                   hard_vocab_limit=False)
    return model.getvalue()


def test_a_t5_tokenizer_travels_with_its_sentencepiece_model(llama_family, tmp_path):
    """T5's tokenizer is its spiece.model: without it the tokenizer loads empty and encodes every word as <unk>."""
    from transformers import AutoTokenizer

    folder = tmp_path / "t5"
    shutil.copytree(llama_family["base"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(folder / name)
    (folder / "spiece.model").write_bytes(spiece_model())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    seme.merge({"merge_method": "linear", "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]},
               str(tmp_path / "out"), progress=False)
    text = "hello world w3 merge"
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text).input_ids == AutoTokenizer.from_pretrained(folder)(text).input_ids
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 60


def llava_tokenizer():
    """A word-level tokenizer of build_llava's 64 tokens, <image> at its image_token_index (60)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(57)] + ["<image>"] + [f"x{i}" for i in range(3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})


def llava_with_processor(path, seed: int, image_mean: float, template: str) -> str:
    """A tiny Llava as the Hub holds one: its tokenizer's files, an image processor's
    preprocessor_config.json, the processor's processor_config.json and its chat template in chat_template.json."""
    pytest.importorskip("PIL")
    from test_multimodal import build_llava
    from transformers import CLIPImageProcessorPil

    build_llava(path, seed)
    llava_tokenizer().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                          image_mean=[image_mean] * 3).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaProcessor", "patch_size": 14,
                                                            "vision_feature_select_strategy": "default"}))
    (path / PROCESSOR_CHAT_TEMPLATE).write_text(json.dumps({"chat_template": template}))
    return str(path)


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return [llava_with_processor(root / "a", 0, 0.25, "a " + TEMPLATE),
            llava_with_processor(root / "b", 1, 0.75, "b " + TEMPLATE)]


def processed(folder):
    """What AutoProcessor makes of an image and a prompt with the model in `folder`, and its chat template."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    image = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = processor(text="<image> w1 w2", images=image, return_tensors="np")
    return type(processor).__name__, out["input_ids"].tolist(), out["pixel_values"], processor.chat_template


def merge(tmp_path, models, **settings) -> str:
    seme.merge({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models],
                **settings}, str(tmp_path / "out"), progress=False)
    return str(tmp_path / "out")


def test_a_merged_llava_loads_with_autoprocessor_as_its_reference_does(llavas, tmp_path):
    out = merge(tmp_path, llavas)
    name, ids, pixels, template = processed(out)
    reference = processed(llavas[0])
    assert (name, ids, template) == (reference[0], reference[1], reference[3])
    assert (name, ids, template) == ("LlavaProcessor", [[60, 60, 60, 4, 5]], "a " + TEMPLATE)  # 2 x 2 patches, less CLS
    np.testing.assert_array_equal(pixels, reference[2])


def test_a_tokenizer_source_brings_the_chat_template_not_the_image_settings(llavas, tmp_path):
    """The processor's image settings are the architecture's (the first model's here); the chat
    template goes with the tokenizer."""
    out = merge(tmp_path, llavas, tokenizer_source=llavas[1])
    _, ids, pixels, template = processed(out)
    np.testing.assert_array_equal(pixels, processed(llavas[0])[2])
    assert template.startswith("b ")


def test_the_recipes_chat_template_wins_over_a_processors(llavas, tmp_path):
    """A processor reads chat_template.json before chat_template.jinja: the recipe's template replaces it."""
    from transformers import AutoProcessor, AutoTokenizer

    out = merge(tmp_path, llavas, chat_template="chatml")
    assert not os.path.exists(os.path.join(out, PROCESSOR_CHAT_TEMPLATE))
    chatml = seme.chat_template.BUILT_IN["chatml"]
    assert AutoProcessor.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(out).chat_template == chatml


def test_seme_takes_the_pivots_processor(llavas, tmp_path):
    from test_multimodal import fine_tune

    a = llavas[0]
    b = fine_tune(a, tmp_path / "b", 1)
    for name in ("preprocessor_config.json", PROCESSOR_CHAT_TEMPLATE):
        shutil.copyfile(os.path.join(llavas[1], name), os.path.join(b, name))
    seme.merge({"merge_method": "seme", "base_model": b, "models": [{"model": a}, {"model": b}], "dtype": "float32"},
               str(tmp_path / "out"), progress=False)
    _, _, pixels, template = processed(tmp_path / "out")
    np.testing.assert_array_equal(pixels, processed(llavas[1])[2])
    assert template.startswith("b ")


@pytest.mark.parametrize("case", ["as is", "tokenizer_source", "chat_template"])
def test_a_chat_template_in_processor_config_follows_the_tokenizer(llama_family, tmp_path, case):
    """transformers' processors once saved their template in processor_config.json, which a processor
    reads before any template file: it is the tokenizer's model's there, and the recipe's template replaces it."""
    a, b = (with_files(llama_family[m], tmp_path / m, {"processor_config.json": json.dumps(
        {"processor_class": "X", "chat_template": f"{m} " + TEMPLATE})}) for m in ("base", "expert0"))
    settings = {"as is": {}, "tokenizer_source": {"tokenizer_source": b}, "chat_template": {"chat_template": "chatml"}}
    written = os.path.join(merge(tmp_path, [a, b], **settings[case]), "processor_config.json")
    expected = {"as is": {"chat_template": "base " + TEMPLATE}, "tokenizer_source": {"chat_template": "expert0 " + TEMPLATE},
                "chat_template": {}}[case]
    with open(written, encoding="utf-8") as f:
        assert json.load(f) == {"processor_class": "X", **expected}
    if case == "as is":  # copied byte for byte
        with open(written, "rb") as f:
            assert f.read() == (tmp_path / "base" / "processor_config.json").read_bytes()


def test_the_recipes_chat_template_replaces_the_named_ones(llama_family, tmp_path):
    from transformers import AutoTokenizer

    a = with_files(llama_family["base"], tmp_path / "a", {f"{CHAT_TEMPLATES}/tool_use.jinja": "tools " + TEMPLATE})
    kept = AutoTokenizer.from_pretrained(merge(tmp_path / "kept", [a])).chat_template
    assert kept == {"tool_use": "tools " + TEMPLATE}
    assert AutoTokenizer.from_pretrained(merge(tmp_path / "set", [a], chat_template="chatml")).chat_template == \
        seme.chat_template.BUILT_IN["chatml"]


def test_overwrite_replaces_a_merge_with_named_templates_and_marian_vocabularies(llama_family, tmp_path):
    a = with_files(llama_family["base"], tmp_path / "a", {f"{CHAT_TEMPLATES}/tool_use.jinja": TEMPLATE, "source.spm": "",
                                                          "target.spm": "", "bpe.codes": ""})
    out = merge(tmp_path, [a])
    assert {"source.spm", "target.spm", "bpe.codes", CHAT_TEMPLATES} <= set(os.listdir(out))
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}}]}))
    assert main([str(path), out, "--overwrite"]) == 0
    (tmp_path / "out" / CHAT_TEMPLATES / "mine.odt").write_text("")  # not the merge's to delete
    assert main([str(path), out, "--overwrite"]) == 2


def whisper(path, seed: int, mel_bins: int = 80) -> str:
    """A tiny Whisper as the Hub holds one: its tokenizer's files with normalizer.json (its text
    normaliser's spellings, which transformers does not save) and a feature extractor's preprocessor_config.json."""
    import torch
    import transformers

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|endoftext|>": 0, "Ġ": 1, **{c: i + 2 for i, c in enumerate(letters)}}
    (path.parent / "normalizer.json").write_text(json.dumps({"colour": "color"}))
    tokenizer = transformers.WhisperTokenizer(vocab=vocab, merges=[], normalizer_file=str(path.parent / "normalizer.json"))
    config = transformers.WhisperConfig(vocab_size=len(vocab), num_mel_bins=mel_bins, d_model=16, encoder_layers=2,
                                        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_target_positions=32,
                                        decoder_start_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.copyfile(path.parent / "normalizer.json", path / "normalizer.json")
    transformers.WhisperFeatureExtractor(feature_size=mel_bins).save_pretrained(path)
    return str(path)


def test_a_merged_whisper_loads_with_autoprocessor_as_its_reference_does(tmp_path):
    from transformers import AutoProcessor

    models = [whisper(tmp_path / name, seed) for seed, name in enumerate(("a", "b"))]
    out = merge(tmp_path, models)
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    source, merged = AutoProcessor.from_pretrained(models[0]), AutoProcessor.from_pretrained(out)
    assert type(merged).__name__ == "WhisperProcessor"
    for got, want in zip(*(p(audio=audio, sampling_rate=16000, text="the colour").values() for p in (merged, source))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert merged.tokenizer.normalize("the colour") == source.tokenizer.normalize("the colour") == "the color"


def test_a_rebuilt_whisper_tokenizer_keeps_its_normalizer(tmp_path):
    # a union vocabulary's tokenizer is saved by transformers, which writes no normalizer.json
    from test_vocabulary import renumbered
    from transformers import AutoProcessor

    models = [whisper(tmp_path / "a", 0), renumbered(whisper(tmp_path / "b", 1), tmp_path / "renumbered", "a", "b")]
    out = merge(tmp_path, models, tokenizer_source="union")
    merged = AutoProcessor.from_pretrained(out)
    assert merged.tokenizer.get_vocab() != AutoProcessor.from_pretrained(models[1]).tokenizer.get_vocab()
    assert merged.tokenizer.normalize("the colour") == "the color"


def with_remote_code(source, folder, mark: str) -> str:
    """`source` as a model whose code the Hub holds beside its weights: config.json's auto_map names its
    configuration and modelling modules (the second imports a third), which load with trust_remote_code."""
    shutil.copytree(source, folder)
    (folder / "configuration_xllama.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass XLlamaConfig(LlamaConfig):\n    model_type = 'xllama'\n")
    (folder / "modeling_xllama.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_xllama import XLlamaConfig\n"
        "from .mark_xllama import MARK\n\n\nclass XLlamaForCausalLM(LlamaForCausalLM):\n"
        "    config_class = XLlamaConfig\n    mark = MARK\n")
    (folder / "mark_xllama.py").write_text(f"MARK = {mark!r}\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="xllama", architectures=["XLlamaForCausalLM"],
                  auto_map={"AutoConfig": "configuration_xllama.XLlamaConfig",
                            "AutoModelForCausalLM": "modeling_xllama.XLlamaForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_remote_code_model_merges_into_one_that_loads_with_its_code(llama_family, tmp_path, monkeypatch):
    """The output's config keeps the auto_map that names the model's code, so the code goes with it: the
    architecture model's Python files, as AutoModel reads them with trust_remote_code."""
    import transformers
    import transformers.dynamic_module_utils

    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    base = with_remote_code(llama_family["base"], tmp_path / "base", "the base's")
    expert = with_remote_code(llama_family["expert0"], tmp_path / "expert", "the expert's")
    out = merge(tmp_path, [expert, base], base_model=base, merge_method="task_arithmetic")
    assert json.loads(open(os.path.join(out, "config.json")).read())["auto_map"]["AutoConfig"] == \
        "configuration_xllama.XLlamaConfig"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "XLlamaForCausalLM" and model.mark == "the base's"


@pytest.mark.parametrize("layout", ["pytorch_model shards", "safetensors shards beside consolidated.safetensors"])
def test_shards_saved_without_their_index_merge_as_the_whole_file(llama_family, tmp_path, layout):
    """Shards a folder holds without the index that lists them (pytorch_model-NNNNN-of-NNNNN.bin as
    safetensors shards), beside a trainer's training_args.bin or a Mistral release's consolidated.safetensors
    (its weights again, under mistral-inference's names), which are no part of them."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "shards"
    shutil.copytree(llama_family["expert0"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(os.path.join(llama_family["expert0"], "model.safetensors"))
    names = sorted(state)
    for i, part in enumerate((names[:7], names[7:])):
        if layout == "pytorch_model shards":
            torch.save({n: state[n] for n in part}, folder / f"pytorch_model-0000{i + 1}-of-00002.bin")
        else:
            save_file({n: state[n] for n in part}, folder / f"model-0000{i + 1}-of-00002.safetensors")
    torch.save({"learning_rate": torch.tensor(1e-5)}, folder / "training_args.bin")
    save_file({"layers.0.attention.wq.weight": state["model.layers.0.self_attn.q_proj.weight"]},
              folder / "consolidated.safetensors")
    recipe = {"merge_method": "ties", "base_model": llama_family["base"], "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}}
                         for m in (str(folder), llama_family["expert1"])]}
    seme.merge(recipe, str(tmp_path / "out"), progress=False)
    seme.merge({**recipe, "models": [{**recipe["models"][0], "model": llama_family["expert0"]}, recipe["models"][1]]},
               str(tmp_path / "whole"), progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
