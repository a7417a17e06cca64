"""A local Hugging Face model folder: config, tensor index (from headers only) and lazy tensor reads."""
from __future__ import annotations

import json
import os
import re

from seme.errors import SemeError
from seme.io.safetensors_file import MappedFile, TensorInfo, read_header
from seme.io.torch_file import read_torch_index

# A PEFT adapter's files, as peft saves them (newest weights first); beside a model's own weights they are no part
# of them.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# The files transformers (5.x) loads a tokenizer from (PreTrainedTokenizerBase.from_pretrained). The
# vocabulary's names depend on the tokenizer class (its `vocab_files_names`), which only transformers
# knows: these are all the names its classes give (tests/test_model_files.py checks that none is missing).
TOKENIZER_FILES = frozenset({
    # every tokenizer's: settings, the fast tokenizer, added and special tokens, the chat template
    "tokenizer_config.json", "tokenizer.json", "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
    # the classes' vocabularies (T5's spiece.model, XLM-R's sentencepiece.bpe.model, Marian's *.spm, ...)
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    "sentencepiece.model", "spm.model", "spm_char.model", "source.spm", "target.spm", "target_vocab.json",
    "vocab-src.json", "vocab-tgt.json", "bpe.codes", "dict.txt", "entity_vocab.json", "emoji.json",
    "byte_maps.json", "prophetnet.tokenizer", "word_shape.json", "word_pronunciation.json",
    "normalizer.json",  # Whisper's text normaliser
    # vocabularies found by name: Mistral's tekken, tiktoken's
    "tekken.json", "tiktoken.model",
})
# A shard of a checkpoint saved in parts, as transformers names them: model-00001-of-00004.safetensors
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<number>\d+)-of-(?P<count>\d+)\.(?P<suffix>safetensors|bin)")
VERSIONED_TOKENIZER = re.compile(r"tokenizer\.[\w.-]+\.json")  # tokenizer.4.0.0.json: for transformers >= 4.0.0
VERSIONED_VOCABULARY = "tokenizer.model."  # Mistral's tokenizer.model.v3, ... (mistral-common reads them)
CHAT_TEMPLATES = "additional_chat_templates"  # named chat templates, <name>.jinja, beside chat_template.jinja
PROCESSOR_CHAT_TEMPLATE = "chat_template.json"  # a processor's template as older transformers saved it
# A processor's settings (image processor, feature extractor, video processor, audio tokenizer, the
# processor's own), as transformers' utils name them; preprocessor_config.json serves image processors
# and feature extractors alike.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "audio_tokenizer_config.json")


def _is_mistral_weights(name: str) -> bool:
    """Mistral's releases keep their weights twice: for transformers, and in consolidated.safetensors (or
    consolidated-NN.safetensors) under mistral-inference's names, which no transformers model has."""
    return name.startswith("consolidated") and name.endswith(".safetensors")


def _adapted_model(adapter: str) -> str:
    """' (trained on M)', M the model a PEFT adapter's config names, or '' where it names none."""
    try:
        with open(os.path.join(adapter, ADAPTER_CONFIG), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (trained on {base})" if isinstance(base, str) and base else ""


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a model folder named `name` belongs to its tokenizer: TOKENIZER_FILES,
    Mistral's versioned vocabularies and a processor's chat template (templates go with the tokenizer)."""
    return name in TOKENIZER_FILES or name.startswith(VERSIONED_VOCABULARY) or name == PROCESSOR_CHAT_TEMPLATE


def read_weights_index(path: str) -> dict[str, TensorInfo]:
    """The tensors of one weights file, as byte ranges of it: a PyTorch checkpoint (`.bin`) or safetensors."""
    return read_torch_index(path) if path.endswith(".bin") else read_header(path)[0]


class ModelFolder:
    @classmethod
    def open(cls, ref: str, hub_names: dict | None = None) -> "ModelFolder":
        """The model a resolved recipe reference names: a folder, or folder+adapter (both folders);
        `hub_names` names hub snapshot folders as the recipe did (Recipe.hub_names)."""
        from seme.config import split_reference

        return cls(*split_reference(ref), hub_names=hub_names)

    def __init__(self, path: str, adapter: str | None = None, hub_names: dict | None = None):
        """The model in folder `path`, with the LoRA adapter in folder `adapter` applied as it is read;
        messages name it by its folder's name, or a hub snapshot by its name in `hub_names` (not by its commit)."""
        from seme.config import join_reference

        self.path = path
        self.ref = join_reference(path, adapter)  # as the resolved recipe names it
        self.name = "+".join((hub_names or {}).get(folder) or os.path.basename(os.path.normpath(folder))
                             for folder in (path, adapter) if folder is not None)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
                raise SemeError(f"{path}: a LoRA adapter ({ADAPTER_CONFIG}), not a model: name it with the model "
                                f"it adapts, as MODEL+ADAPTER{_adapted_model(path)}")
            raise SemeError(f"{path}: no config.json (not a Hugging Face model folder)")
        try:
            with open(config_path, encoding="utf-8") as f:
                self.config = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8
            raise SemeError(f"{config_path}: cannot read: {e}") from None
        if not isinstance(self.config, dict):
            raise SemeError(f"{config_path}: not a JSON object")
        # what the architecture is looked up by (architectures[0], model_type)
        archs, model_type = self.config.get("architectures"), self.config.get("model_type")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise SemeError(f"{config_path}: architectures must be a list of class names, got {archs!r}")
        if model_type is not None and not isinstance(model_type, str):
            raise SemeError(f"{config_path}: model_type must be a string, got {model_type!r}")
        quantized = self.config.get("quantization_config")
        if quantized:  # packed integers and scales: merged as numbers they would be garbage, copied they would not merge
            scheme = quantized.get("quant_method", "unknown scheme") if isinstance(quantized, dict) else "unknown scheme"
            raise SemeError(f"{path}: its weights are quantized ({scheme}); seme merges unquantized weights: "
                            f"dequantize the model first (e.g. to bf16)")
        self.tensors = self._index()
        self._maps: dict[str, MappedFile] = {}
        self.adapter = None
        # an adapter saved beside the weights (Granite Speech's, which its generate enables for audio): not read
        self.adapter_beside = adapter is None and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
        if adapter is not None:
            from seme.io.lora import LoraAdapter

            self.adapter = LoraAdapter(adapter, self.tensors)

    def _weight_files(self) -> tuple[dict | None, list[str]]:
        """(the index's weight map or None, the weight files), in mergekit's order: safetensors
        first, then PyTorch's pytorch_model.bin, each sharded (with an index, or shards without one) or whole."""
        for weights in ("model.safetensors", "pytorch_model.bin"):
            index_path = os.path.join(self.path, weights + ".index.json")
            if os.path.isfile(index_path):
                try:
                    with open(index_path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                    files = sorted(set(weight_map.values()))
                except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
                    raise SemeError(f"{index_path}: malformed index ({e})") from None
                if not all(isinstance(file, str) for file in files):
                    raise SemeError(f"{index_path}: malformed index (a file name that is not a string)")
                return weight_map, files
            if os.path.isfile(os.path.join(self.path, weights)):
                return None, [weights]
            files = self._unindexed_shards(weights)
            if files:
                return None, files
        others = sorted(f for f in os.listdir(self.path) if f.endswith((".bin", ".pt")) or _is_mistral_weights(f))
        found = f" (only {others[0]}, which is not pytorch_model.bin)" if others else ""
        if others and _is_mistral_weights(others[0]):
            found = f" (only {others[0]}: Mistral's own format, under mistral-inference's tensor names)"
        raise SemeError(f"{self.path}: no safetensors or pytorch_model.bin weights found{found}")

    def _unindexed_shards(self, weights: str) -> list[str]:
        """The shards of `weights` saved without their index: the folder's safetensors files (bar a PEFT adapter's
        beside them and Mistral's consolidated copy of the weights, whose names are not transformers'), or
        pytorch_model-NNNNN-of-NNNNN.bin (its other .bin files are a trainer's: training_args.bin). Numbered shards
        must all be there: the index that would name a missing one is not."""
        names = [f for f in os.listdir(self.path) if self._holds(f)]
        if weights.endswith(".safetensors"):
            files = sorted(f for f in names if f.endswith(".safetensors") and f not in ADAPTER_WEIGHTS
                           and not _is_mistral_weights(f))
        else:
            files = sorted(f for f in names if (m := SHARD_NAME.fullmatch(f)) and m["stem"] == "pytorch_model"
                           and m["suffix"] == "bin")
        series: dict[tuple, set[int]] = {}
        for f in files:
            if m := SHARD_NAME.fullmatch(f):
                series.setdefault((m["stem"], m["count"], m["suffix"]), set()).add(int(m["number"]))
        for (stem, count, suffix), numbers in series.items():
            missing = next((n for n in range(1, int(count) + 1) if n not in numbers), None)
            if missing is not None:
                raise SemeError(f"{self.path}: shard {stem}-{missing:0{len(count)}d}-of-{count}.{suffix} is missing "
                                f"(an unfinished download or copy?), and no index lists the shards")
        return files

    def _index(self) -> dict[str, TensorInfo]:
        weight_map, files = self._weight_files()
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            path = os.path.join(self.path, file)
            if os.path.dirname(os.path.normpath(file)) or not os.path.isfile(path):
                raise SemeError(f"{self.path}: weight file '{file}' is missing or outside the model folder")
            infos = read_weights_index(path)
            for name, info in infos.items():
                if name in tensors:
                    raise SemeError(f"{self.path}: tensor '{name}' appears in two files")
                if weight_map is None or weight_map.get(name) == file:
                    tensors[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise SemeError(f"{self.path}: index names tensor '{missing[0]}' that its file does not contain")
        return tensors

    def load(self, name: str):
        """The tensor `name`: a zero-copy view of the memory-mapped file, or, where the adapter
        changes it, a new tensor."""
        tensor = self._mapped(name).tensor(self.tensors[name])
        return self.adapter.merged(name, tensor) if self.adapted(name) else tensor

    def adapted(self, name: str) -> bool:
        """Whether the adapter changes `name` (its bytes in the file are not the tensor's)."""
        return self.adapter is not None and name in self.adapter.updates

    def files(self) -> list[str]:
        """Every file the tensors are read from, the adapter's included."""
        found = {info.path for info in self.tensors.values()}
        return sorted(found | set(self.adapter.files if self.adapter else ()))

    def prefetch(self, name: str) -> None:
        """Start reading `name` from disk in the background (no-op where madvise is unavailable)."""
        self._mapped(name).prefetch(self.tensors[name])

    def address(self, name: str) -> int:
        """Where `name`'s data lies in memory (the file is mapped on first use); not for adapted tensors."""
        assert not self.adapted(name), name
        return self._mapped(name).address(self.tensors[name])

    def view(self, name: str) -> memoryview:
        """`name`'s bytes, zero-copy; not for adapted tensors."""
        assert not self.adapted(name), name
        return self._mapped(name).view(self.tensors[name])

    def release(self, name: str, evict: bool = False) -> None:
        """Drop `name`'s pages from this process's resident memory; with `evict`, from the page cache
        too (`MappedFile.release`)."""
        self._mapped(name).release(self.tensors[name], evict)

    def _mapped(self, name: str) -> MappedFile:
        path = self.tensors[name].path
        if path not in self._maps:
            self._maps[path] = MappedFile(path)
        return self._maps[path]

    def tokenizer_files(self) -> list[str]:
        """The tokenizer's files (paths in the folder): those named by is_tokenizer_file, the versioned
        fast tokenizers its tokenizer_config.json lists (`fast_tokenizer_files`) and the named chat
        templates (additional_chat_templates/*.jinja)."""
        found = sorted(f for f in os.listdir(self.path) if is_tokenizer_file(f) and self._holds(f))
        if "tokenizer_config.json" in found:
            try:
                with open(os.path.join(self.path, "tokenizer_config.json"), encoding="utf-8") as f:
                    versioned = json.load(f).get("fast_tokenizer_files") or []
            except (OSError, ValueError, AttributeError):
                versioned = []  # transformers says what is wrong with it where it loads the copy
            found += sorted({f for f in versioned if isinstance(f, str) and VERSIONED_TOKENIZER.fullmatch(f)
                             and f not in found and self._holds(f)})
        templates = os.path.join(self.path, CHAT_TEMPLATES)
        if os.path.isdir(templates):
            found += sorted(f"{CHAT_TEMPLATES}/{f}" for f in os.listdir(templates)
                            if f.endswith(".jinja") and self._holds(f"{CHAT_TEMPLATES}/{f}"))
        return found

    def code_files(self) -> list[str]:
        """The model's own code, which the auto_map of its config (or tokenizer or processor settings) names for
        trust_remote_code: configuration_*.py, modeling_*.py, tokenization_*.py and the modules they import, which
        transformers finds beside them. All the folder's Python files, as the Hub holds a model's code."""
        return sorted(f for f in os.listdir(self.path) if f.endswith(".py") and self._holds(f))

    def processor_files(self) -> list[str]:
        """The processor's settings files the folder holds (PROCESSOR_FILES)."""
        return [f for f in PROCESSOR_FILES if self._holds(f)]

    def _holds(self, file: str) -> bool:
        return os.path.isfile(os.path.join(self.path, file))
