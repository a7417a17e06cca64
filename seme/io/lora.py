"""A LoRA adapter applied to its model as the model is read (mergekit's `model+adapter` references).

Where mergekit has peft merge the adapter into a full copy of the model on disk first, seme changes
each adapted weight as the weight is read, to the values `PeftModel.from_pretrained(model,
adapter).merge_and_unload()` gives: the adapter's half-precision weights upcast to fp32 as peft loads
them, W + (B @ A) · scaling added in place to W's dtype (an embedding's update rounded to it first,
as peft does; `r` from the weights, `lora_alpha` and `alpha_pattern`, `use_rslora`,
`fan_in_fan_out`). Beside plain LoRA on linear and embedding layers it applies DoRA (W' = m / ‖W + ΔW‖ · (W + ΔW), norms per output), LoRA biases (`lora_bias`: b += b_B ·
scaling), trainable tokens (rows of an embedding replaced), and the tensors peft saves whole — layer
weights (`base_layer`), trained biases (`bias: all | lora_only`) and `modules_to_save` — which replace
the model's, cast to its dtype. Any other entry or layer kind is refused by name.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from seme.errors import SemeError
from seme.io.model import ADAPTER_CONFIG as CONFIG
from seme.io.model import ADAPTER_WEIGHTS as WEIGHTS
from seme.io.model import read_weights_index
from seme.io.safetensors_file import MappedFile, TensorInfo

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

_PREFIX = "base_model.model."
_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "embedding A", "lora_embedding_B": "B",
          "lora_B.bias": "bias", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
          "token_adapter.trainable_tokens_delta": "tokens"}
_PART = re.compile(rf"^(?P<module>.+)\.(?P<part>{'|'.join(re.escape(p) for p in _PARTS)})$")


@dataclass(frozen=True)
class _Lora:
    a: TensorInfo
    b: TensorInfo
    scaling: float
    transpose: bool  # fan_in_fan_out layers and embeddings keep their weights as (B @ A)ᵀ
    embedding: bool  # peft rounds an embedding's update to the weight's dtype before adding it
    magnitude: TensorInfo | None  # DoRA's, one per output


@dataclass(frozen=True)
class _Update:
    """What the adapter does to one model tensor, in peft's order."""
    saved: TensorInfo | None = None  # saved whole with the adapter: replaces the model's
    rows: tuple[tuple[int, ...], TensorInfo] | None = None  # trainable tokens: these rows replaced
    lora: _Lora | None = None
    bias: tuple[TensorInfo, float] | None = None  # lora_B's bias and the layer's scaling, added


class LoraAdapter:
    def __init__(self, path: str, tensors: dict[str, TensorInfo]):
        """The adapter in folder `path`, checked against its model's `tensors`."""
        self.path = path
        weights = next((w for w in WEIGHTS if os.path.isfile(os.path.join(path, w))), WEIGHTS[0])
        self.files = [os.path.join(path, CONFIG), os.path.join(path, weights)]
        try:
            with open(self.files[0], encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise SemeError(f"{self.files[0]}: cannot read: {e}") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise SemeError(f"{path}: a {config.get('peft_type')} adapter; seme applies LoRA adapters only")
        if not os.path.isfile(self.files[1]):
            raise SemeError(f"{path}: no {' or '.join(WEIGHTS)}")
        infos = read_weights_index(self.files[1])
        parts: dict[str, dict[str, TensorInfo]] = {}
        updates: dict[str, _Update] = {}
        for key, info in infos.items():
            if not key.startswith(_PREFIX):
                raise SemeError(f"{path}: adapter entry '{key}' is not a LoRA entry (no '{_PREFIX}' prefix)")
            m = _PART.match(key[len(_PREFIX):])
            if m:
                parts.setdefault(m["module"], {})[_PARTS[m["part"]]] = info
                continue
            # saved whole: a layer weight (`base_layer`), a trained bias or a module to save
            name = key[len(_PREFIX):].replace(".base_layer.", ".")
            if name not in tensors:
                raise SemeError(f"{path}: the adapter saves '{name}', which the model does not store"
                                + (" (tied to its embeddings?)" if "lm_head" in name else ""))
            if tuple(info.shape) != tuple(tensors[name].shape):
                raise SemeError(f"{path}: the adapter's '{name}' is {list(info.shape)}, "
                                f"the model's {list(tensors[name].shape)}")
            updates[name] = _Update(saved=info)
        alpha, patterns = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
        _check_alphas(self.files[0], alpha, patterns)
        for module, part in parts.items():
            target = f"{module}.weight"
            if target not in tensors:
                raise SemeError(f"{path}: adapter module '{module}' has no weight in the model")
            w = tensors[target]
            if "tokens" in part:
                if set(part) != {"tokens"}:
                    raise SemeError(f"{path}: adapter module '{module}' has both LoRA weights and trainable tokens")
                rows = (_token_indices(path, config, module, w.shape[0]), part["tokens"])
                if tuple(rows[1].shape) != (len(rows[0]), *w.shape[1:]):
                    raise SemeError(f"{path}: adapter module '{module}' has {list(rows[1].shape)} trainable tokens "
                                    f"for {len(rows[0])} indices of a {list(w.shape)} weight")
                updates[target] = replace(updates.get(target, _Update()), rows=rows)
                continue
            a = part.get("A", part.get("embedding A"))
            if a is None or "B" not in part:
                raise SemeError(f"{path}: adapter module '{module}' has no A and B pair")
            b, r = part["B"], a.shape[0]
            if r == 0:
                raise SemeError(f"{path}: adapter module '{module}' has rank 0 (A {list(a.shape)}): it scales by lora_alpha / 0")
            embedding = "embedding A" in part
            transpose = embedding or bool(config.get("fan_in_fan_out"))
            expected = (b.shape[0], a.shape[1]) if not transpose else (a.shape[1], b.shape[0])
            if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r or tuple(w.shape) != expected:
                raise SemeError(f"{path}: adapter module '{module}' has A {list(a.shape)} and B {list(b.shape)}, "
                                f"which do not fit the weight {list(w.shape)}")
            key = next((p for p in patterns if re.match(rf"(.*\.)?{p}$", module)), None)
            lora_alpha = patterns[key] if key is not None else alpha
            scaling = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
            outputs = b.shape[0]  # DoRA's norms and the LoRA bias are per output: B's rows
            magnitude = part.get("magnitude")
            if magnitude is not None and tuple(magnitude.shape) != (outputs,):
                raise SemeError(f"{path}: adapter module '{module}' has a DoRA magnitude of shape "
                                f"{list(magnitude.shape)}, not [{outputs}]")
            lora = _Lora(a, b, scaling, transpose, embedding, magnitude)
            updates[target] = replace(updates.get(target, _Update()), lora=lora)
            if "bias" in part:
                bias = f"{module}.bias"
                if bias not in tensors or {tuple(part["bias"].shape), tuple(tensors[bias].shape)} != {(outputs,)}:
                    raise SemeError(f"{path}: adapter module '{module}' has a LoRA bias of shape "
                                    f"{list(part['bias'].shape)}, and the model's layer no bias of that shape")
                updates[bias] = replace(updates.get(bias, _Update()), bias=(part["bias"], scaling))
        self.updates = updates
        self._map: MappedFile | None = None

    def working_bytes(self, name: str, info: TensorInfo) -> int:
        """What merging `name` (the model's `info`) holds beside the model's bytes: the changed copy and
        its fp32 temporaries (two for a LoRA update while it is scaled, three for DoRA's)."""
        lora = self.updates[name].lora
        return info.nbytes + (0 if lora is None else (3 if lora.magnitude is not None else 2) * 4 * math.prod(info.shape))

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The model's tensor `name` (`weight`) as the adapter changes it, in a new tensor."""
        import torch

        u = self.updates[name]
        if self._map is None:
            self._map = MappedFile(self.files[1])
        out = (self._map.tensor(u.saved) if u.saved is not None else weight).to(weight.dtype, copy=True)
        if u.rows is not None:
            out.index_copy_(0, torch.tensor(u.rows[0]), self._map.tensor(u.rows[1]).to(out.dtype))
        # peft holds the adapter's weights in its layer's dtype, half precision upcast to fp32, whatever
        # dtype they were saved in (loading casts them: an fp64 A beside an fp32 B is fp32 too)
        held = torch.promote_types(weight.dtype, torch.float32)
        if u.lora is not None:
            out = _lora_merged(out, u.lora, lambda info: self._map.tensor(info).to(held))
        if u.bias is not None:
            out += self._map.tensor(u.bias[0]).to(held) * u.bias[1]
        return out


def _lora_merged(w: torch.Tensor, lora: _Lora, load) -> torch.Tensor:
    """w with the LoRA (or DoRA) update merged, as peft's merge does it; in place for plain LoRA."""
    import torch

    a, b = load(lora.a), load(lora.b)
    delta = b @ a
    delta = (delta.T if lora.transpose else delta) * lora.scaling
    if lora.magnitude is None:
        w += delta.to(w.dtype) if lora.embedding else delta
        return w
    # the norm of each output's weights, W and ΔW as peft lays them out ([outputs, inputs])
    norm = torch.linalg.norm(w.T + delta.T if lora.transpose else w + delta, dim=1)
    factor = load(lora.magnitude) / norm
    factor = factor.view(1, -1) if lora.transpose else factor.view(-1, 1)
    return (factor * (w + delta)).to(w.dtype)


def _check_alphas(config_path: str, alpha, patterns) -> None:
    """lora_alpha and alpha_pattern (module pattern -> its lora_alpha), as the scalings read them."""
    if not isinstance(patterns, dict):
        raise SemeError(f"{config_path}: alpha_pattern must be a mapping of module pattern to lora_alpha, got {patterns!r}")
    for pattern, value in [(None, alpha), *patterns.items()]:
        where = "lora_alpha" if pattern is None else f"alpha_pattern[{pattern!r}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SemeError(f"{config_path}: {where} must be a finite number, got {value!r}")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise SemeError(f"{config_path}: {where} is no regular expression: {e}") from None


def _token_indices(path: str, config: dict, module: str, rows: int) -> tuple[int, ...]:
    """The rows of `module`'s weight that `trainable_token_indices` names (a list for the input
    embedding, or a mapping from module names)."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    if not isinstance(spec, list) or not all(isinstance(i, int) and 0 <= i < rows for i in spec) \
            or len(set(spec)) != len(spec):
        raise SemeError(f"{path}: trainable_token_indices names no distinct rows of '{module}' (0..{rows - 1})")
    return tuple(spec)
