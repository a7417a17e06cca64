"""A LoRA adapter applied to its model as the model is read (mergekit's `model+adapter` references).

Where mergekit has peft merge the adapter into a full copy of the model on disk first, seme adds
each adapted weight's update as the weight is read: W + (B @ A) · scaling, in the order and dtypes
of peft's `merge_and_unload` (the product in fp32 where the adapter is half precision, cast to the
adapter's dtype, added in place to W's dtype). Plain LoRA on linear and embedding layers is read
(`r` from the weights, `lora_alpha` and `alpha_pattern`, `use_rslora`, `fan_in_fan_out`), and the
layer weights peft saves beside them (`base_layer`, as it does for embeddings), which replace the
model's; an adapter with anything else (DoRA, trained biases, `modules_to_save`, other layer kinds)
is refused by name.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from seme.errors import SemeError
from seme.io.safetensors_file import MappedFile, TensorInfo, read_header

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_ENTRY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                    r"lora_embedding_A|lora_embedding_B|base_layer\.weight)$")


@dataclass(frozen=True)
class _Update:
    a: TensorInfo | None  # None: the weight is only replaced
    b: TensorInfo | None
    scaling: float
    transpose: bool  # fan_in_fan_out layers and embeddings keep their weights as (B @ A)ᵀ
    weight: TensorInfo | None  # the layer weight saved with the adapter, which replaces the model's


class LoraAdapter:
    def __init__(self, path: str, tensors: dict[str, TensorInfo]):
        """The adapter in folder `path`, checked against its model's `tensors`."""
        self.path = path
        self.files = [os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)]
        try:
            with open(self.files[0], encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise SemeError(f"{self.files[0]}: cannot read: {e}") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise SemeError(f"{path}: a {config.get('peft_type')} adapter; seme applies LoRA adapters only")
        for key, what in (("use_dora", "DoRA"), ("lora_bias", "trained biases"), ("modules_to_save", "modules_to_save")):
            if config.get(key):
                raise SemeError(f"{path}: the adapter uses {what}, which seme does not apply yet; merge it with peft first")
        if not os.path.isfile(self.files[1]):
            raise SemeError(f"{path}: no {WEIGHTS} (seme reads safetensors only)")
        infos, _ = read_header(self.files[1])
        parts: dict[str, dict[str, TensorInfo]] = {}
        embeddings = set()
        for key, info in infos.items():
            m = _ENTRY.match(key)
            if not m:
                raise SemeError(f"{path}: adapter entry '{key}' is not a LoRA A or B matrix; seme applies plain LoRA only")
            parts.setdefault(m["module"], {})[m["part"].split(".")[0].replace("embedding_", "")] = info  # lora_A, lora_B, base_layer
            if m["part"].startswith("lora_embedding"):
                embeddings.add(m["module"])
        alpha, patterns = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
        self.updates: dict[str, _Update] = {}
        for module, pair in parts.items():
            target = f"{module}.weight"
            if target not in tensors or (set(pair) - {"base_layer"} not in ({"lora_A", "lora_B"}, set())):
                raise SemeError(f"{path}: adapter module '{module}' has no A and B pair or no weight in the model")
            replaced, w = pair.get("base_layer"), tensors[target]
            if replaced is not None and (tuple(replaced.shape) != tuple(w.shape) or replaced.dtype != w.dtype):
                raise SemeError(f"{path}: the adapter's '{module}' weight is {replaced.dtype} {list(replaced.shape)}, "
                                f"the model's {w.dtype} {list(w.shape)}")
            if "lora_A" not in pair:
                self.updates[target] = _Update(None, None, 0.0, False, replaced)
                continue
            a, b = pair["lora_A"], pair["lora_B"]
            transpose = module in embeddings or bool(config.get("fan_in_fan_out"))
            r = a.shape[0]
            expected = (b.shape[0], a.shape[1]) if not transpose else (a.shape[1], b.shape[0])
            if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r or tuple(w.shape) != expected:
                raise SemeError(f"{path}: adapter module '{module}' has A {list(a.shape)} and B {list(b.shape)}, "
                                f"which do not fit the weight {list(w.shape)}")
            key = next((p for p in patterns if re.match(rf"(.*\.)?{p}$", module)), None)
            lora_alpha = patterns[key] if key is not None else alpha
            scaling = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
            self.updates[target] = _Update(a, b, scaling, transpose, replaced)
        self._map: MappedFile | None = None

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The model's tensor `name` (`weight`) as the adapter changes it, in a new tensor: the layer
        weight saved with the adapter in its place where there is one, plus the update."""
        import torch

        u = self.updates[name]
        if self._map is None:
            self._map = MappedFile(self.files[1])
        if u.weight is not None:
            weight = self._map.tensor(u.weight)
        if u.a is None:
            return weight.clone()
        a, b = self._map.tensor(u.a), self._map.tensor(u.b)
        dtype = b.dtype
        if dtype in (torch.float16, torch.bfloat16):  # peft multiplies half adapters in fp32 on CPU
            a, b = a.float(), b.float()
        delta = b @ a
        delta = (delta.T if u.transpose else delta) * u.scaling
        out = weight.clone()
        out += delta.to(dtype)
        return out
