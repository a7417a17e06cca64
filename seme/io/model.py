"""A local Hugging Face model folder: config, tensor index (from headers only) and lazy tensor reads."""
from __future__ import annotations

import glob
import json
import os

from seme.errors import SemeError
from seme.io.safetensors_file import MappedFile, TensorInfo, read_header
from seme.io.torch_file import read_torch_index

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")


def read_weights_index(path: str) -> dict[str, TensorInfo]:
    """The tensors of one weights file, as byte ranges of it: a PyTorch checkpoint (`.bin`) or safetensors."""
    return read_torch_index(path) if path.endswith(".bin") else read_header(path)[0]


class ModelFolder:
    @classmethod
    def open(cls, ref: str) -> "ModelFolder":
        """The model a resolved recipe reference names: a folder, or folder+adapter (both folders)."""
        from seme.config import split_reference

        return cls(*split_reference(ref))

    def __init__(self, path: str, adapter: str | None = None):
        """The model in folder `path`, with the LoRA adapter in folder `adapter` applied as it is read."""
        from seme.config import join_reference

        self.path = path
        self.ref = join_reference(path, adapter)  # as the resolved recipe names it
        self.name = os.path.basename(os.path.normpath(path))
        if adapter is not None:
            self.name += "+" + os.path.basename(os.path.normpath(adapter))
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise SemeError(f"{path}: no config.json (not a Hugging Face model folder)")
        try:
            with open(config_path, encoding="utf-8") as f:
                self.config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SemeError(f"{config_path}: cannot read: {e}") from None
        if not isinstance(self.config, dict):
            raise SemeError(f"{config_path}: not a JSON object")
        quantized = self.config.get("quantization_config")
        if quantized:  # packed integers and scales: merged as numbers they would be garbage, copied they would not merge
            scheme = quantized.get("quant_method", "unknown scheme") if isinstance(quantized, dict) else "unknown scheme"
            raise SemeError(f"{path}: its weights are quantized ({scheme}); seme merges unquantized weights: "
                            f"dequantize the model first (e.g. to bf16)")
        self.tensors = self._index()
        self._maps: dict[str, MappedFile] = {}
        self.adapter = None
        if adapter is not None:
            from seme.io.lora import LoraAdapter

            self.adapter = LoraAdapter(adapter, self.tensors)

    def _weight_files(self) -> tuple[dict | None, list[str]]:
        """(the index's weight map or None, the weight files), in mergekit's order: safetensors
        first, then PyTorch's pytorch_model.bin, each sharded (with an index) or whole."""
        for weights in ("model.safetensors", "pytorch_model.bin"):
            index_path = os.path.join(self.path, weights + ".index.json")
            if os.path.isfile(index_path):
                try:
                    with open(index_path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                    files = sorted(set(weight_map.values()))
                except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise SemeError(f"{index_path}: malformed index ({e})") from None
                if not all(isinstance(file, str) for file in files):
                    raise SemeError(f"{index_path}: malformed index (a file name that is not a string)")
                return weight_map, files
            if os.path.isfile(os.path.join(self.path, weights)):
                return None, [weights]
            if weights == "model.safetensors":
                files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
                if files:
                    return None, files
        others = sorted(glob.glob(os.path.join(self.path, "*.bin")) + glob.glob(os.path.join(self.path, "*.pt")))
        found = f" (only {os.path.basename(others[0])}, which is not pytorch_model.bin)" if others else ""
        raise SemeError(f"{self.path}: no safetensors or pytorch_model.bin weights found{found}")

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
        return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(self.path, f))]

    def vocabulary(self) -> dict[str, int] | None:
        """token -> id from tokenizer.json (or vocab.json), added tokens included; None without either."""
        path = os.path.join(self.path, "tokenizer.json")
        try:
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                model_vocab = data.get("model", {}).get("vocab", {})
                if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
                    vocab = {piece: i for i, (piece, _) in enumerate(model_vocab)}
                else:
                    vocab = dict(model_vocab)
                for tok in data.get("added_tokens", []):
                    vocab[tok["content"]] = tok["id"]
                return vocab
            path = os.path.join(self.path, "vocab.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return dict(json.load(f))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise SemeError(f"{path}: cannot read the vocabulary: {e}") from None
        return None
