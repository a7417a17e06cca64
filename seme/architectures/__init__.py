"""Tensor-role tables per model architecture.

The tables are data (``data/<family>.json``); this module loads them and answers, for a
checkpoint tensor name, which role the tensor plays relative to the residual stream:

  embedding, position_embedding, lm_head   [V, d] / [P, d] / [V, d]; a position_embedding's rows are added to the
                                           stream by another index than the token's (position, or BERT's token type)
  lm_head_bias                             [V]: the head's bias (phi), a row per token like the head
  token_table                              [V, k]: another table of a row per token, outside the residual stream
                                           (Gemma's per-layer embeddings): its rows follow the tokens, never turned;
                                           laid out in_out, [k, V], a column per token (MobileBERT's head's)
  final_norm, final_norm_bias              the norm before the head
  norm, norm_bias                          a norm that reads the residual stream inside a layer, before the
                                           first (bloom's and BERT's over the embeddings), or, marked
                                           ``after_layers``, after the last (ModernBERT's final_norm, which feeds
                                           the head's dense read rather than the head)
  read                                     a Linear whose input is the residual, normalised by its `norm`, or raw
                                           where it has none (q/k/v, gate/up, fused)
  write, write_bias                        a Linear whose output is added to the residual, and its bias
  stream_vector                            [d]: a vector in the residual stream that no write adds (Llava-NeXT's
                                           image_newline, which takes a token's place), or [G, d], G of them
                                           (PEGASUS-X's global tokens): turns as embeddings' rows
  write_norm                               a norm applied to a sublayer's output before the add (gemma2)
  stream_gain                              [d]: a gain that multiplies the residual stream, or a sublayer's output
                                           before the add, channel by channel (ZAYA's residual scaling): no turn
                                           of the stream commutes with it
  stream_map                               a [d, d] Linear from the residual stream to the residual stream
                                           (gemma 3n's AltUp projections between its parallel streams), or from
                                           the stream normalised by its `norm` (DeciLM's linear replacements of
                                           an attention or MLP)
  inner                                    anything else (biases of read projections, per-head q/k norms)
  buffer                                   a constant that is not a weight (gpt2 causal masks): copy, never merge

A ``tie_key`` null marks a head that is never tied, whatever the config says (CPM-Ant's: its embedding holds
prompt rows too, and transformers ties nothing).
Norm gains are effective as ``norm_gain_offset + w`` (1.0 for gemma's ``(1 + w)`` RMSNorm), or, where a norm's
spec sets its own ``gain_offset``, as that + w (Muse Glimmer's final norm multiplies by w, its layers' by (1 + w)):
``Architecture.gain_offset`` says which holds for a tensor;
``norm_type`` says whether the norms are RMSNorms or LayerNorms (which subtract the mean, so a
rotation of the residual stream does not commute with them). ``normed_residual`` marks a family
whose sublayers carry their norm's output on as the residual (post-LN, MiniMax-Text-01): the
gains then scale the stream itself, and a rotation of it does not commute with them either.
``gainless_norms`` marks a family whose norms have no weights (OLMo 1's non-parametric LayerNorm):
its reads have no ``norm`` to fold, yet read the normalised stream, not the raw one.
``rotation_obstacles`` names what keeps a family from being turned. A template may hold
``{expert}`` (a mixture of experts' per-expert tensors; ``expert_{expert}`` where each expert's module is named
so: Switch Transformers') or ``{head}`` (per-head norms) after ``{layer}``: the role is the same for every
index, and the concrete template keeps it. A tensor outside the layers that packs one block per layer
(Gemma's per-layer token tables) gives the axis in ``layer_blocks``: seme.plan refuses merges that would
move or drop its layers' blocks. A family whose config decides each layer's tensors by its index and the depth
(Switch Transformers' sparse step) says why in ``fixed_layers``: slices that move, drop or repeat layers are refused.
``{shard}`` (``shard_{shard}``) spells that inner index for a table that checkpoints split into row blocks (Qwen4-Exp's
n-gram embeddings, which transformers concatenates on load and splits again on save).
``{ffn}`` spells it for the feed-forward networks a layer stacks (MobileBERT's ffn.N).
A family whose residual is several parallel streams of width d (Qwen4-Exp's hyper-connections) names the config key
of their count in ``streams_key``: its norms over the stream normalise each stream and have a gain over them all,
[streams * d], where a single stream's are [d].
A ``layout`` ``either`` marks fused experts that checkpoints keep both ways (Qwen3-VL-MoE's: [E, in, out] on
the Hub, [E, out, in] as transformers 5 saves them): ``orientation`` tells which from the tensor's shape.

A family whose tensors depend on its config (falcon's norms, stablelm's parallel residual) lists
``variants``: the first whose ``when`` values all equal the config's overlays its ``tensors`` on
the family's (``null`` drops a template; a ``when`` value ``{"differs_from": key}`` holds where the config sets the
value unlike its ``key``'s: ELECTRA's embedding_size; ``{"other_than": value}`` where it sets another value: ConvBERT's
num_groups), and may set its own ``tied_default`` (a model type whose
config class ties the head by default, where checkpoints may leave the key out; or a ``tie_key`` null: a class that
never ties its head, whatever the config says, BigBirdPegasusForCausalLM's) and ``norm_type``
(a model type whose norms are LayerNorms where the family's are RMSNorms, or one whose config
chooses), ``normed_residual`` (OPT's post-norm opt-350m), ``unrotatable`` (DeBERTa-v2's convolution) and
``base_prefix`` (CLIP's text model, saved on its own without the ``text_model.`` that CLIPModel's checkpoints
give its tensors), and its ``parts`` (T5Gemma's encoder saved alone, whose classification head is the encoder's).
A family whose layers differ in kind by a config list (``layer_kinds``: its ``key``, e.g. layer_types,
and per kind an overlay of ``tensors`` like a variant's) gives a template the kind's role in the
layers of that kind: OLMo Hybrid's feedforward_layer_norm feeds the MLP in its linear-attention
layers, but normalises the attention's output in the others. ``for_config`` binds the config's kinds.
Where the config lists layer indices instead (Mllama's cross_attention_layers), ``listed_kind`` names the kind
of the layers it lists; the others have the table's own tensors. Where it holds a dict of settings per layer
(DeciLM's block_configs), ``flags`` says that each kind is named by a dotted setting (attention.no_op): a layer has
the kinds whose setting is true in its entry, each kind's overlay laid over the table's (a layer's kind: their names
joined by +).
``layer_tensors`` overlays the roles of single layers by index, whatever the config (ModernBERT's first layer
has no attention norm: its attention reads the stream raw).
``named_entries`` binds a placeholder of the templates to the entries of a config list: X-MOD's
``adapter_modules.{language}`` stand for one adapter per entry of its config's ``languages``, by name; or to the
indices a config count gives (GIT's ``img_temporal_embedding.{frame}``, one per frame of num_image_with_embedding).
``unloaded`` lists the name prefixes of modules that checkpoints store but transformers does not load
(Qwen3-Next's multi-token prediction, ``mtp.``): their tensors have roles, but they are no layers of
the model's stack (seme.plan merges them after the decoder, as it does layers after the last).
A multimodal model (Llava, Gemma 3, Qwen2-VL, ...) whose `text_config` (InternVL-chat's remote code: `llm_config`)
names a family with a table gets that table for its language model, moved to where the checkpoint keeps it
(``for_config`` given the checkpoint's tensor names). Where ``data/multimodal/projectors.json`` describes the projector's
writes into the language model's stream (and its reads of it: Janus' generation head, whose norm it names as the
language model's table does), the other parts' tensors are inner (they work in coordinates of their own); elsewhere
they have no roles, and such a model cannot be aligned by rotation. A wrapper whose config keeps its language model's
settings at its top level (MiniCPM-V's remote code), or under a key no other wrapper uses for it (DeepSeek-VL's
language_config), declares it in projectors.json's ``languages``: where its checkpoints keep it, where its settings
are, and its family, or the config key whose value chooses it. Its ``towers``
declare, as parts are declared below, a wrapper's tower whose names no marker in seme.architectures.modules tells
from a language model's (Granite Speech's audio encoder, saved as ``encoder.``): ``part_of`` and ``beside_language``
take its tensors and layers as that tower's, never the language model's. A family whose own
table holds a multimodal model (Phi-4-multimodal, whose image and audio embedders sit beside its decoder in one
``model.`` namespace, with no text_config) says so with ``projected``: its table names the embedders' writes, and
its tensors in seme.architectures.modules' other parts are inner, in layer stacks of their own.
An encoder-decoder family (T5, Whisper) lists its ``parts``: the modules mergekit's per-module recipes
(``modules:``) name, each by the name prefixes of its tensors, with the config key of its depth and the
prefixes of the loose tensors that come before its layers (``leading``: taken from a module's first
slice, as mergekit's pre-weights are). ``part_of`` tells a tensor's part; a family without parts has
seme.architectures.modules' (a language model, a vision tower, ...). Image encoders (ViT) and image-text models
(CLIP, SigLIP) list theirs too: their towers, by their prefixes (text_model, vision_model), whose depth lives in
the config's text_config / vision_config, and whose ``leading`` say what precedes the layers where no role does
(a patch embedding, a class token). A ``num_layers_key``, a ``hidden_size_key`` or a part's ``depth_key`` may
name a sub-config's setting, dotted (CLIP's ``vision_config.num_hidden_layers``, T5Gemma 2's
``encoder.text_config.num_hidden_layers``).
A family whose function no turn of the residual stream by its roles can keep (zamba2's shared attention
reads the stream and the embeddings concatenated) says why in ``unrotatable``; SeMe then refuses to
align its models by rotation.
Deliberately stdlib-only (seme.errors is too): it is imported before torch/transformers are needed.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

from seme.architectures import modules
from seme.errors import SemeError

ROLES = frozenset({
    "embedding", "position_embedding", "lm_head", "lm_head_bias", "final_norm", "final_norm_bias",
    "norm", "norm_bias", "read", "write", "write_bias", "write_norm", "stream_map", "stream_vector", "inner",
    "buffer", "token_table", "stream_gain",
})
VOCAB_ROLES = ("embedding", "lm_head", "lm_head_bias", "token_table")  # a row per token
LAYOUTS = ("out_in", "in_out", "either")
NORM_TYPES = ("rms_norm", "layer_norm")

# A decimal path segment, or the index of an `expert_N` segment (Switch Transformers' experts) or a `shard_N` one
# (Qwen4-Exp's n-gram embedding's row blocks): the candidate layer or expert index of a name.
_SEGMENT = re.compile(r"(?:^|(?<=\.)|(?<=\.expert_)|(?<=\.shard_))\d+(?=\.|$)")
# The spellings of the one inner index after {layer}: per expert, per head (norms), per shard (split tables), per
# stacked feed-forward network
_INNER_INDEX = ("{head}", "{shard}", "{ffn}")
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class TensorRole:
    role: str
    layer: int | None
    template: str
    norm: str | None
    layout: str
    optional: bool
    tied_to: str | None
    layer_blocks: int | None = None  # the axis along which it packs one block per layer (Gemma's per-layer tables)
    after_layers: bool = False
    gain_offset: float | None = None  # a norm's own offset, where it is not the family's norm_gain_offset


@dataclass(frozen=True)
class Part:
    """A module of an encoder-decoder family, as mergekit's per-module recipes name it."""
    name: str
    prefixes: tuple[str, ...]
    depth_key: str | None  # the config key of its layers' count, dotted in a sub-config (None: look for it)
    leading: tuple[str, ...]  # prefixes of its loose tensors that precede its layers


@dataclass(frozen=True)
class TensorSpec:
    role: str
    norm: str | None = None
    layout: str = "out_in"
    optional: bool = False
    tied_to: str | None = None
    layer_blocks: int | None = None
    after_layers: bool = False  # a loose norm over the last layer's output (a slice takes it from its last models)
    gain_offset: float | None = None  # a norm's own offset, where it is not the family's norm_gain_offset


# eq=False: instances are per-family singletons, identity hashing suffices.
@dataclass(frozen=True, eq=False)
class Architecture:
    name: str
    inferred: bool
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    hidden_size_keys: tuple[str, ...] = ("hidden_size",)
    tie_key: str | None = "tie_word_embeddings"  # None: a head never tied, whatever the config says
    tied_default: bool = False
    norm_gain_offset: float = 0.0
    norm_type: str = "rms_norm"
    normed_residual: bool = False
    gainless_norms: bool = False  # norms without weights: a read without a `norm` still reads the normalised stream
    base_prefix: str = ""
    unloaded: tuple[str, ...] = ()
    notes: str = ""
    unrotatable: str = ""  # why a rotation of the residual stream by the roles would change the function
    fixed_layers: str = ""  # why slices may not move, drop or repeat its layers
    streams_key: str = ""  # the config key of the number of parallel residual streams ("": one)
    tensors: dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    variant: str = ""  # the config values that chose this variant ("" for the family's own table)
    settings_key: str = ""  # where config.json holds this family's settings ("text_config" in a multimodal model)
    projected: bool = False  # a multimodal model whose projector's writes are described (the rest beside: inner)
    variants: tuple[tuple[dict, Architecture], ...] = field(default=(), repr=False)
    layer_kinds_key: str = ""  # the config list of the layers' kinds whose overlays kind_tensors holds
    kind_tensors: dict[str, dict[str, TensorSpec | None]] = field(default_factory=dict, repr=False)
    listed_kind: str = ""  # the kind of the layers whose indices the config's layer_kinds_key lists ("": it lists kinds)
    kind_flags: bool = False  # the config list holds each layer's settings, whose true dotted flags are its kinds
    kinds: tuple[str, ...] = ()  # each layer's kind, as the config that chose this table says ("": the table's own)
    layer_tensors: dict[int, dict[str, TensorSpec | None]] = field(default_factory=dict, repr=False)  # by layer index
    named_entries: tuple[tuple[str, str], ...] = ()  # (placeholder, config key of the names or count it stands for)
    parts: tuple[Part, ...] = ()  # an encoder-decoder family's modules
    towers: tuple[Part, ...] = ()  # a wrapper's towers that no marker in their names tells (Granite Speech's encoder.)
    _cache: dict[str, TensorRole | None] = field(default_factory=dict, init=False, repr=False)

    @property
    def label(self) -> str:
        """The family's name, with the config values that chose its variant."""
        return f"{self.name} ({self.variant})" if self.variant else self.name

    def variant_for(self, config: dict) -> Architecture:
        """The variant of this family that `config` describes, with its layers' kinds."""
        chosen = next((v for when, v in self.variants if all(_holds(config, k, value) for k, value in when.items())), self)
        for placeholder, key in self.named_entries:
            entries = config.get(key)
            if isinstance(entries, int) and not isinstance(entries, bool):  # a count: indices 0 .. count - 1
                entries = range(entries)
            if isinstance(entries, (list, range)):
                chosen = _with_entries(chosen, placeholder, tuple(map(str, entries)))
        kinds = config.get(self.layer_kinds_key) if self.layer_kinds_key else None
        if self.listed_kind and isinstance(kinds, list):  # indices of the layers of that kind
            kinds = [self.listed_kind if i in kinds else "" for i in range(max(kinds, default=-1) + 1)]
        elif self.kind_flags and isinstance(kinds, list):  # each layer's settings: the kinds it sets true
            kinds = ["+".join(k for k in self.kind_tensors if _flag(entry, k)) for entry in kinds]
        return _with_kinds(chosen, tuple(kinds)) if isinstance(kinds, list) else chosen

    def spec(self, template: str, layer: int | None) -> TensorSpec | None:
        """The role of `template` in `layer`: the layer's own (layer_tensors), or its layer kind's, where their
        overlay names it."""
        if template in self.layer_tensors.get(layer, {}):
            return self.layer_tensors[layer][template]
        if layer is not None and layer < len(self.kinds):
            for kind in self.kinds[layer].split("+"):  # several flags' kinds (DeciLM's): their overlays in turn
                overlay = self.kind_tensors.get(kind, {})
                if template in overlay:
                    return overlay[template]
        return self.tensors.get(template)

    def settings(self, config: dict) -> dict:
        """The part of `config` that describes this family's model."""
        return config.get(self.settings_key) or config if self.settings_key else config

    def num_layers(self, config: dict, source: str = "config.json") -> int:
        """The depth `config` (read from `source`, which a refusal names) gives."""
        depth = _first(self.settings(config), self.num_layers_keys)
        if isinstance(depth, list):  # a list of the layers' kinds (nemotron_h)
            return len(depth)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise SemeError(f"{source}: the depth ({' or '.join(self.num_layers_keys)}) must be a non-negative "
                            f"integer, got {depth!r}")
        return depth

    def hidden_size(self, config: dict) -> int:
        return int(_first(self.settings(config), self.hidden_size_keys))

    def streams(self, config: dict) -> int:
        """How many parallel residual streams of hidden_size the model keeps (its norms' gains span them all)."""
        return int(self.settings(config)[self.streams_key]) if self.streams_key else 1

    def tied(self, config: dict) -> bool:
        if self.tie_key is None:  # never tied, whatever the config says
            return False
        # A multimodal model ties as its top-level config says (transformers reads it there); a dotted key names
        # a sub-config's setting (an EncoderDecoderModel's decoder.tie_word_embeddings).
        found = config_entry(config, self.tie_key) or config_entry(self.settings(config), self.tie_key)
        return bool(found[0][found[1]]) if found else self.tied_default

    def unloaded_module(self, tensor_name: str) -> str | None:
        """The prefix of the module transformers does not load that holds the tensor, if one does."""
        return next((p for p in self.unloaded if tensor_name.startswith(p)), None)

    def part_of(self, name: str) -> str:
        """The part (the module a `modules:` recipe names) that holds the tensor or layer stack `name`."""
        found = self._declared_part(name)
        return found.name if found else modules.part_of(name)

    def beside_language(self, name: str) -> bool:
        """Whether the tensor or layer stack `name` belongs to a tower or projector beside the language model: by the
        markers in its name (seme.architectures.modules) or in one of the wrapper's towers."""
        return not modules.is_language(modules.part_of(name)) or any(name.startswith(t.prefixes) for t in self.towers)

    def depth_key(self, part: str) -> str | None:
        """The config key of a declared part's depth (None: look for it, seme.architectures.modules)."""
        return next((p.depth_key for p in (*self.parts, *self.towers) if p.name == part), None)

    def leads(self, name: str) -> bool:
        """Whether a loose tensor of a part comes before its layers (a slice takes it from its first models):
        its part's `leading` where declared, else an embedding by its name."""
        declared = self.leads_declared(name)
        return "embed" in name if declared is None else declared

    def leads_declared(self, name: str) -> bool | None:
        """Whether a loose tensor comes before its layers by its part's declared `leading` (None: none declared)."""
        found = self._declared_part(name)
        if found is None or not found.leading:
            return None
        return any(candidate.startswith(found.leading) for candidate in (name, self.base_prefix + name))

    def _declared_part(self, name: str) -> Part | None:
        for candidate in (name, self.base_prefix + name) if self.parts else ():
            found = next((p for p in self.parts if candidate.startswith(p.prefixes)), None)
            if found:
                return found
        return next((t for t in self.towers if name.startswith(t.prefixes)), None)

    def rotation_obstacles(self) -> list[str]:
        """Why turning the residual stream by the role table would change this family's function
        (none: it would not)."""
        why = []
        if self.norm_type == "layer_norm":
            why.append("its norms are LayerNorms, which subtract the mean")
        if self.normed_residual:
            why.append("its sublayers carry their norm's output on as the residual, so the norm gains scale the stream")
        overlays = (s for overlay in self.kind_tensors.values() for s in overlay.values() if s is not None)
        roles = {s.role for s in (*self.tensors.values(), *overlays)}  # in every kind of layer
        if "write_norm" in roles:
            why.append("its sublayer outputs are normalised before the residual add")
        if "stream_gain" in roles:
            why.append("its residual stream is scaled channel by channel")
        if self.unrotatable:
            why.append(self.unrotatable)
        if self.settings_key and not self.projected:
            why.append("its vision projector, which writes into the language model's stream, is not described")
        return why

    def role(self, tensor_name: str) -> TensorRole | None:
        try:
            return self._cache[tensor_name]
        except KeyError:
            found = self._infer(tensor_name) if self.inferred else self._match(tensor_name)
            self._cache[tensor_name] = found
            return found

    def gain_offset(self, norm: str) -> float:
        """What the norm gain tensor `norm` adds to its weights to make its effective gain: its own gain_offset
        where its spec sets one, else the family's norm_gain_offset."""
        found = self.role(norm)
        return self.norm_gain_offset if found is None or found.gain_offset is None else found.gain_offset

    def layer_name(self, template: str, layer: int) -> str:
        return template.replace("{layer}", str(layer))

    def rename_layer(self, tensor_name: str, new_layer: int) -> str:
        found = self.role(tensor_name)
        if found is None or found.layer is None:
            raise ValueError(f"{tensor_name!r} is not a per-layer tensor of {self.name}")
        return self.layer_name(found.template, new_layer)

    def _match(self, name: str) -> TensorRole | None:
        found = self._lookup(name, "")
        # Checkpoints saved from the bare base model (e.g. GPT2Model on the Hub) lack base_prefix.
        if found is None and self.base_prefix and not name.startswith(self.base_prefix):
            found = self._lookup(self.base_prefix + name, self.base_prefix)
        if self.projected and self.beside_language(name):
            # Beside the language model, layer stacks are what the name pattern finds (a vision tower's
            # layers; Qwen3-VL's deepstack mergers are no layers); what projectors.json does not name is inner.
            layer, template = _pattern_layer(name)
            found = replace(found, layer=layer, template=template) if found else \
                TensorRole("inner", layer, template, None, "out_in", False, None)
        return found

    def _lookup(self, name: str, strip: str) -> TensorRole | None:
        """Role of a full (prefixed) name; concrete names drop `strip` to match the checkpoint."""
        for layer, expert, template in _candidates(name):
            spec = self.spec(template, layer)
            if spec is not None:
                norm = spec.norm and self.layer_name(spec.norm, layer)[len(strip):]
                concrete = template if expert is None else template.replace("{expert}", str(expert))
                return TensorRole(spec.role, layer, concrete[len(strip):], norm, spec.layout,
                                  spec.optional, spec.tied_to, spec.layer_blocks, spec.after_layers, spec.gain_offset)
        return None

    def _infer(self, name: str) -> TensorRole | None:
        layer, template = _pattern_layer(name)
        parts = name.split(".")
        module, is_bias = parts[-2] if len(parts) > 1 else "", parts[-1] == "bias"
        if module in _POSITION:
            role = "position_embedding"
        elif module in _HEAD:
            role = "lm_head_bias" if is_bias else "lm_head"
        elif module in _EMBED or ("embed" in module and "norm" not in module):  # LFM2's final embedding_norm
            role = "embedding"
        elif "norm" in module or module.startswith("ln"):
            role = ("norm" if layer is not None else "final_norm") + ("_bias" if is_bias else "")
        elif module in _READ:
            role = "inner" if is_bias else "read"
        elif module in _WRITE:
            role = "write_bias" if is_bias else "write"
        else:
            return None
        return TensorRole(role, layer, template, None, "out_in", False, None)


_POSITION = frozenset({"wpe", "embed_positions", "position_embeddings"})
_EMBED = frozenset({"wte", "word_embeddings"})
_HEAD = frozenset({"lm_head", "embed_out"})  # embed_out: gpt_neox checkpoints' head
_READ = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj",
                   "qkv", "c_attn", "c_fc", "fc1", "query_key_value", "dense_h_to_4h"})
_WRITE = frozenset({"o_proj", "down_proj", "dense", "c_proj", "fc2", "out_proj", "dense_4h_to_h"})


def _pattern_layer(name: str) -> tuple[int | None, str]:
    """(layer index, template) of a name by the layer pattern alone ((None, name) outside layers)."""
    m = LAYER_PATTERN.search(name)
    return (int(m.group(1)), name[:m.start(1)] + "{layer}" + name[m.end(1):]) if m else (None, name)


def orientation(layout: str, role: str, shape, hidden: int) -> str:
    """"out_in" or "in_out" for a tensor of `shape` whose role has `layout`: a layout "either" resolved as
    transformers resolves it when it loads such a tensor, out_in (its in-memory [E, out, in]) where the
    residual width `hidden` sits on that axis (a read's last, a write's next to last), else in_out."""
    if layout != "either":
        return layout
    return "out_in" if shape[-1 if role == "read" else -2] == hidden else "in_out"


def _holds(config: dict, key: str, value) -> bool:
    """Whether config's `key` is `value`, or, where `value` is {"differs_from": other}, set and unlike config's
    `other` (ELECTRA's embedding_size, where it is not hidden_size), or, where it is {"other_than": x}, set and not x
    (ConvBERT's num_groups, where its feed-forward layers are grouped)."""
    if isinstance(value, dict) and set(value) == {"differs_from"}:
        return key in config and config[key] != config.get(value["differs_from"])
    if isinstance(value, dict) and set(value) == {"other_than"}:
        return key in config and config[key] != value["other_than"]
    return config.get(key) == value


def _flag(entry, key: str) -> bool:
    """Whether a layer's settings (a dict) set the dotted flag `key` true."""
    found = config_entry(entry, key) if isinstance(entry, dict) else None
    return bool(found and found[0][found[1]] is True)


def _first(config: dict, keys: tuple[str, ...]):
    for key in keys:
        found = config_entry(config, key)
        if found:
            return found[0][found[1]]
    raise SemeError(f"config.json has none of {', '.join(keys)}")


def config_entry(config: dict, key: str) -> tuple[dict, str] | None:
    """(the settings that hold `key`, its name there) where `config` sets it: a dotted key names a setting of a
    sub-config (vision_config.num_hidden_layers: CLIPForImageClassification's depth), at any depth
    (encoder.text_config.num_hidden_layers: T5Gemma 2's encoder's)."""
    *sections, name = key.split(".")
    settings = config
    for section in sections:
        settings = settings.get(section) if isinstance(settings, dict) else None
    return (settings, name) if isinstance(settings, dict) and name in settings else None


def _candidates(name: str):
    """(layer, expert, template) triples: the name itself, then each numeric segment as {layer}, then
    each pair of them as {layer} and {expert}."""
    yield None, None, name
    segments = list(_SEGMENT.finditer(name))
    for m in segments:
        yield int(m.group()), None, name[:m.start()] + "{layer}" + name[m.end():]
    for i, m in enumerate(segments):
        for e in segments[i + 1:]:
            template = name[:m.start()] + "{layer}" + name[m.end():e.start()] + "{expert}" + name[e.end():]
            yield int(m.group()), int(e.group()), template


# What a variant may set of its own (besides its tensors and norm_type); the rest is its family's.
_VARIANT_SETTINGS = ("tied_default", "tie_key", "normed_residual", "unrotatable", "base_prefix")


def _parse(data: dict) -> Architecture:
    name = data["name"]
    norm_type = _norm_type(name, data.get("norm_type", "rms_norm"))
    tensors = _specs(name, data["tensors"], norm_type)
    family = dict(
        name=name, inferred=False,
        architectures=tuple(data["architectures"]), model_types=tuple(data["model_types"]),
        num_layers_keys=_keys(data["num_layers_key"]), hidden_size_keys=_keys(data["hidden_size_key"]),
        tie_key=data["tie_key"], tied_default=data["tied_default"],
        norm_gain_offset=float(data["norm_gain_offset"]), norm_type=norm_type,
        normed_residual=data.get("normed_residual", False), gainless_norms=data.get("gainless_norms", False),
        base_prefix=data.get("base_prefix", ""), unloaded=tuple(data.get("unloaded", ())), notes=data.get("notes", ""),
        unrotatable=data.get("unrotatable", ""), fixed_layers=data.get("fixed_layers", ""),
        streams_key=data.get("streams_key", ""),
        projected=data.get("projected", False),
        parts=_parts(data.get("parts", {})),
        named_entries=tuple(data.get("named_entries", {}).items()),
    )
    kinds = data.get("layer_kinds", {})
    if kinds:
        family["layer_kinds_key"], family["listed_kind"] = kinds["key"], kinds.get("listed_kind", "")
        family["kind_flags"] = kinds.get("flags", False)
        if family["listed_kind"] and family["listed_kind"] not in kinds["tensors"]:
            raise ValueError(f"{name}: listed_kind {family['listed_kind']!r} has no tensors")
        family["kind_tensors"] = {kind: _kind_specs(name, data["tensors"], overlay, norm_type)
                                  for kind, overlay in kinds["tensors"].items()}
    family["layer_tensors"] = {int(i): _kind_specs(name, data["tensors"], overlay, norm_type)
                               for i, overlay in data.get("layer_tensors", {}).items()}
    variants = []
    for v in data.get("variants", ()):
        own_norm_type = _norm_type(name, v.get("norm_type", norm_type))
        specs = _overlaid(name, data["tensors"], v.get("tensors", {}), own_norm_type)
        label = ", ".join(f"{k}={json.dumps(x)}" for k, x in v["when"].items())
        own = {**family, **{k: v[k] for k in _VARIANT_SETTINGS if k in v}, "norm_type": own_norm_type}
        if "parts" in v:
            own["parts"] = _parts(v["parts"])
        variants.append((v["when"], Architecture(**own, tensors=specs, variant=label)))
    return Architecture(**family, tensors=tensors, variants=tuple(variants))


def _parts(raw_parts: dict) -> tuple[Part, ...]:
    return tuple(Part(part, tuple(raw["prefixes"]), raw.get("depth_key"), tuple(raw.get("leading", ())))
                 for part, raw in raw_parts.items())


def _overlaid(family: str, tensors: dict, overlay: dict, norm_type: str) -> dict[str, TensorSpec]:
    """The specs of the raw `tensors` with `overlay` laid over them (a variant's or a layer kind's; None
    drops a template)."""
    return _specs(family, {t: raw for t, raw in {**tensors, **overlay}.items() if raw is not None}, norm_type)


def _kind_specs(family: str, tensors: dict, overlay: dict, norm_type: str) -> dict[str, TensorSpec | None]:
    """A layer kind's specs (None where the kind drops a template), checked against the table they overlay."""
    specs = _overlaid(family, tensors, overlay, norm_type)
    return {_one_inner_index(t): raw and specs[_one_inner_index(t)] for t, raw in overlay.items()}


@cache
def _with_kinds(family: Architecture, kinds: tuple[str, ...]) -> Architecture:
    """`family` with its layers' kinds bound (one object per family and kinds)."""
    return replace(family, kinds=kinds)


@cache
def _with_entries(family: Architecture, placeholder: str, entries: tuple[str, ...]) -> Architecture:
    """`family` with each template that holds `placeholder` written out once per entry (its norm too)."""
    fill = lambda text, entry: text and text.replace(placeholder, entry)
    tensors = {}
    for template, spec in family.tensors.items():
        if placeholder not in template:
            tensors[template] = spec
            continue
        for entry in entries:
            tensors[fill(template, entry)] = replace(spec, norm=fill(spec.norm, entry), tied_to=fill(spec.tied_to, entry))
    return replace(family, tensors=tensors)


def _one_inner_index(template: str) -> str:
    """`template` with its inner index spelt {expert}, however the table spells it."""
    for spelling in _INNER_INDEX:
        template = template.replace(spelling, "{expert}")
    return template


def _norm_type(family: str, norm_type: str) -> str:
    if norm_type not in NORM_TYPES:
        raise ValueError(f"{family}: bad norm_type {norm_type!r}")
    return norm_type


def _keys(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


_SPEC_KEYS = frozenset(("role", "norm", "layout", "optional", "tied_to", "layer_blocks", "after_layers", "gain_offset"))
GAIN_ROLES = ("norm", "final_norm", "write_norm")  # norm gains: what a gain_offset may be set on


def _specs(family: str, raw_tensors: dict, norm_type: str, own_refs: bool = True) -> dict[str, TensorSpec]:
    """The specs of a table's `raw_tensors`; the norms and ties they name are among them where `own_refs` (a
    projector's read names its language model's norm: checked where the two meet, seme.architectures._moved)."""
    tensors = {}
    for template, raw in raw_tensors.items():
        unknown = sorted(set(raw) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"{family}: {template!r} has unknown keys {unknown}")
        spec = TensorSpec(raw["role"], raw.get("norm"), raw.get("layout", "out_in"), raw.get("optional", False),
                          raw.get("tied_to"), raw.get("layer_blocks"), raw.get("after_layers", False),
                          raw.get("gain_offset"))
        if spec.role not in ROLES or spec.layout not in LAYOUTS:
            raise ValueError(f"{family}: bad role/layout for {template!r}")
        if spec.after_layers and (spec.role not in ("norm", "norm_bias") or "{layer}" in template):
            raise ValueError(f"{family}: {template!r}: only a norm outside the layers can be after_layers")
        if spec.gain_offset is not None and spec.role not in GAIN_ROLES:
            raise ValueError(f"{family}: {template!r} has a gain_offset, which only a norm's gain can have")
        if spec.layout == "either" and spec.role not in ("read", "write"):
            raise ValueError(f"{family}: {template!r} has layout either, which only a read or a write can have")
        if spec.role in ("norm_bias", "final_norm_bias") and norm_type != "layer_norm":
            raise ValueError(f"{family}: {template!r} is a norm bias but norm_type is {norm_type}")
        tensors[_one_inner_index(template)] = spec
    for template, spec in tensors.items() if own_refs else ():
        for ref in (spec.norm, spec.tied_to):
            if ref is not None and ref not in tensors:
                raise ValueError(f"{family}: {template!r} refers to unknown tensor {ref!r}")
    return tensors


@cache
def _tables() -> dict[str, dict]:
    """Every table's JSON by family name, sorted; parsed into an Architecture where it is asked for
    (`_family`): a merge reads one or two of them, and parsing them all was most of its planning."""
    root = resources.files(__package__) / "data"
    loaded = (json.loads(f.read_text()) for f in root.iterdir() if f.name.endswith(".json"))
    return {t["name"]: t for t in sorted(loaded, key=lambda t: t["name"])}


@cache
def _family(name: str) -> Architecture:
    return _parse(_tables()[name])


@cache
def _projectors_data() -> dict:
    return json.loads((resources.files(__package__) / "data" / "multimodal" / "projectors.json").read_text())


@cache
def _projectors() -> dict[str, dict[str, TensorSpec]]:
    """Per multimodal architecture, the roles of its projector's writes into the language model."""
    return {arch: _specs(arch, tensors, "rms_norm", own_refs=False) for arch, tensors in _projectors_data().items()
            if arch not in ("notes", "towers", "languages")}


@cache
def _towers() -> dict[str, tuple[Part, ...]]:
    """Per multimodal architecture, the towers that no marker in their names tells (projectors.json's towers)."""
    return {arch: _parts(towers) for arch, towers in _projectors_data()["towers"].items()}


def _declared_language(config: dict, names, wrapper: str, declared: dict) -> Architecture:
    """The table of `wrapper`'s language model as projectors.json's languages declare it: its family (DeepSeek-VL's
    remote code always builds a Llama), or the family the config's version chooses (MiniCPM-V's), its settings under
    `settings` (none: the config's own); inferred roles where it is not described."""
    settings, family = declared["settings"], declared.get("family")
    what = f"{family}'s table"
    if family is None:
        version = config.get(declared["key"])
        if version is None:
            version = next(v["version"] for v in declared["unversioned"]
                           if all(_holds(config, k, value) for k, value in v["when"].items()))
        family = declared["families"].get(str(version))
        what = f"{declared['key']} {version}; they describe {', '.join(declared['families'])}"
    if family is not None:
        moved = _moved(_family(family).variant_for(config.get(settings) or config if settings else config),
                       declared["prefix"], wrapper, _described(_projector(declared["prefix"], wrapper), names),
                       settings_key=settings)
        if _describes(moved, names):
            return moved
    return _inferred_because(f"seme's tables do not describe this {wrapper} checkpoint's language model ({what})")


@cache
def _index() -> tuple[dict[str, str], dict[str, str]]:
    """Family names by architecture class and by model type."""
    by_arch, by_type = {}, {}
    for name, table in _tables().items():
        by_arch.update(dict.fromkeys(table["architectures"], name))
        by_type.update(dict.fromkeys(table["model_types"], name))
    return by_arch, by_type


def _describes(family: Architecture, names) -> bool:
    """Whether a table describes a checkpoint of tensor `names`: most of its language model's have a role in it (a
    checkpoint may keep a few tensors its table does not know, which SeMe names where it refuses them, and towers
    beside its language model, which its table may not describe)."""
    language = [n for n in names if not family.beside_language(n)]
    return 2 * sum(family.role(n) is not None for n in language) >= len(language)


def _inferred_because(why: str) -> Architecture:
    """Roles inferred from tensor names, with a warning that says `why` (at for_config's caller)."""
    warnings.warn(f"{why}; tensor roles are inferred from tensor names", stacklevel=3)
    return _inferred()


@cache
def _inferred() -> Architecture:
    return Architecture(
        name="inferred", inferred=True,
        num_layers_keys=("num_hidden_layers", "n_layer", "num_layers"),
        hidden_size_keys=("hidden_size", "n_embd", "d_model"),
    )


def for_config(config: dict, names=None) -> Architecture:
    """The architecture of an HF config.json dict: by architectures[0], then model_type; for a
    multimodal model, given its checkpoint's tensor `names`, its language model's family's."""
    by_arch, by_type = _index()
    archs = config.get("architectures") or [None]
    found = by_arch.get(archs[0]) or by_type.get(config.get("model_type"))
    if found is not None:
        family = _family(found).variant_for(config)
        if names is not None and not _describes(family, names):
            return _inferred_because(f"the tensors of this {archs[0] or config.get('model_type')} checkpoint do not "
                                     f"follow seme's {family.name} table (a layout it does not describe, such as "
                                     f"ChatGLM-6B's under ChatGLMModel)")
        return family
    if config.get("model_type") in _COMPOSITIONS:
        composed = _composition(config, by_type)
        if composed is not None:
            return composed
    declared = _projectors_data()["languages"].get(archs[0])
    if names is not None and declared is not None:
        return _declared_language(config, names, archs[0], declared)
    text_key = modules.settings_key(config, modules.TEXT)
    text = config.get(text_key)
    if names is not None and text_key and text.get("model_type") in by_type:
        family, prefix = _family(by_type[text["model_type"]]).variant_for(text), _text_prefix(names)
        wrapper = archs[0] or config.get("model_type")
        # Where the described projector writes are missing (a layout the description does not know), or one is not
        # the last of its numbered list (a deeper MLP than the description's), the model is not projected: no
        # rotation rather than an unturned projector.
        described = _described(_projector(prefix, wrapper), names)
        head_nested = any(n.startswith(prefix + "lm_head.") for n in names) if prefix == _NESTED_DECODER else False
        moved = _moved(family, prefix, wrapper, described, head_nested, text_key)
        if _describes(moved, names):
            return moved
        # a layout no prefix here knows (DeepSeek-VL2's remote code keeps its language_config's model as language.)
        return _inferred_because(f"the tensors of this {wrapper} checkpoint's language model do not follow seme's "
                                 f"{family.name} table where it looks for them")
    return _inferred_because(f"unknown architecture {archs[0]!r} (model_type {config.get('model_type')!r})")


# Where multimodal checkpoints keep their language model: the whole causal LM nested
# (`language_model.model.layers`, `language_model.lm_head`: transformers 4's layout, and 5's when it
# saves Llava or Gemma 3), its decoder nested beside a top-level head (`model.language_model.layers`,
# `lm_head`: Qwen3-VL, Qwen3.5; `model.text_model.layers`: Idefics3, SmolVLM; or with its head beside it,
# `model.language_model.lm_head`: HyperCLOVAX-SEED Vision), or its decoder's own names (`model.layers` beside
# `visual`: Qwen2-VL). Emu3 nests the whole causal LM as `text_model.` (`text_model.model.layers`, `text_model.lm_head`).
_NESTED_LM, _NESTED_DECODER, _TEXT_MODEL = "language_model.", "model.language_model.", "model.text_model."
_NESTED_TEXT_LM = "text_model."
# (prefix, how the names of a checkpoint that keeps its language model there begin)
_TEXT_PREFIXES = ((_NESTED_DECODER, _NESTED_DECODER), (_TEXT_MODEL, _TEXT_MODEL), (_NESTED_LM, _NESTED_LM),
                  (_NESTED_TEXT_LM, _NESTED_TEXT_LM + "model."))


def _text_prefix(names) -> str:
    for prefix, begins in _TEXT_PREFIXES:
        if any(n.startswith(begins) for n in names):
            return prefix
    return ""


def _described(projector: dict[str, TensorSpec], names) -> bool:
    """Whether the checkpoint `names` hold every required tensor of `projector` (one of its writes, where each is
    optional: DeepSeek-VL's aligner ends in layers.1, layers.2 or layers by its projector's type), no later entry of
    a numbered list than the one it holds (Janus' aligner.hidden_layers.0 is its last Linear only where its depth is 2),
    and in a numbered list that holds writes (Janus' remote gen_aligner.layers.2) one of them where it holds any entry
    (a gen_aligner of depth 1 ends in layers.0)."""
    if not all(t in names for t, spec in projector.items() if not spec.optional):
        return False
    writes = [t for t, spec in projector.items() if spec.role == "write"]
    if writes and all(projector[t].optional for t in writes) and not any(t in names for t in writes):
        return False
    write_lists = {t[:m.start()] for t in writes for m in _ENTRY.finditer(t)}
    for head in write_lists:
        held = any(n.startswith(head) and _ENTRY_START.match(n, len(head)) for n in names)
        if held and not any(t.startswith(head) and t in names for t in writes):
            return False
    lists = {(t[:m.start()], int(m.group())) for t in projector if "{" not in t and t in names
             for m in _ENTRY.finditer(t)}
    for n in names:
        for head, index in lists:
            later = n.startswith(head) and _ENTRY_START.match(n, len(head))
            if later and int(later.group(1)) > index:
                return False
    return True


_ENTRY = re.compile(r"(?<=\.)\d+(?=\.)")  # a numbered list's entry in a name (mlp.2.weight)
_ENTRY_START = re.compile(r"(\d+)\.")


def _projector(prefix: str, wrapper: str | None) -> dict[str, TensorSpec]:
    """The projector writes of `wrapper` (projectors.json names them as transformers 4 saved them),
    where checkpoints whose decoder is nested as `prefix` keep them: transformers 5 nests every part
    under `model.` (`model.multi_modal_projector.`, `model.visual.`)."""
    moved = "model." if prefix == _NESTED_DECODER else ""
    return {moved + t: spec for t, spec in _projectors().get(wrapper, {}).items()}


def _wrapper_towers(prefix: str, wrapper: str | None) -> tuple[Part, ...]:
    """The towers of `wrapper` that no marker in their names tells (Granite Speech's audio encoder, encoder.), where
    checkpoints whose decoder is nested as `prefix` keep them, as _projector moves its writes."""
    moved = lambda names: tuple(("model." if prefix == _NESTED_DECODER else "") + n for n in names)
    return tuple(replace(p, prefixes=moved(p.prefixes), leading=moved(p.leading)) for p in _towers().get(wrapper, ()))


@cache
def _moved(family: Architecture, prefix: str, wrapper: str, projected: bool, head_nested: bool = False,
           settings_key: str = "text_config") -> Architecture:
    """`family`'s table with its templates where the multimodal `wrapper`'s checkpoints keep them
    (`prefix`; the head too where `head_nested`), its settings read from the config's `settings_key`; with
    its projector's writes where `projected` and projectors.json describes them (which may be none: Mllama's
    projector feeds its cross-attention's keys and values, not the stream)."""
    def move(template: str | None) -> str | None:
        if template is None or not prefix:
            return template
        if prefix not in (_NESTED_DECODER, _TEXT_MODEL):  # the whole causal LM nested (MiniCPM-V's llm. too)
            return prefix + template
        base = family.base_prefix
        if template.startswith(base):
            return prefix + template[len(base):]
        return prefix + template if head_nested else template

    tensors = _renamed(family.tensors, move)
    kind_tensors = {kind: _renamed(overlay, move) for kind, overlay in family.kind_tensors.items()}
    # a projector's read names its language model's norm as the family's table does (Janus' generation head reads the
    # final norm's output); a norm the family lacks leaves the projector undescribed
    projector = {t: replace(s, norm=move(s.norm)) for t, s in _projector(prefix, wrapper).items()} if projected else {}
    projected = projected and all(s.norm in tensors for s in projector.values() if s.norm)
    return replace(family, tensors={**tensors, **projector} if projected else tensors, kind_tensors=kind_tensors,
                   projected=projected and wrapper in _projectors(), towers=_wrapper_towers(prefix, wrapper),
                   base_prefix=move(family.base_prefix),
                   settings_key=settings_key, variants=(),
                   variant=f"{family.variant}, in {wrapper}" if family.variant else f"in {wrapper}")


def _renamed(specs: dict, rename) -> dict:
    """`specs` with their templates, and the norms and ties they name, renamed by `rename` (a template it renames
    to None is left out; a None spec, an overlay's dropped template, stays None)."""
    return {rename(t): s and replace(s, norm=rename(s.norm), tied_to=rename(s.tied_to)) for t, s in specs.items()
            if rename(t) is not None}


# Models that compose two described models, each of its own config (encoder, decoder): transformers'
# EncoderDecoderModel, VisionEncoderDecoderModel and SpeechEncoderDecoderModel.
_COMPOSITIONS = ("encoder-decoder", "vision-encoder-decoder", "speech-encoder-decoder")


def _composition(config: dict, by_type: dict[str, str]) -> Architecture | None:
    """The table of a model that composes the families of its `encoder` and `decoder` sub-configs (None where
    either has no table, or where both have layer kinds, whose one list of kinds cannot say which stack's)."""
    subs = config.get("encoder"), config.get("decoder")
    if not all(isinstance(sub, dict) and sub.get("model_type") in by_type for sub in subs):
        return None
    encoder, decoder = (_family(by_type[sub["model_type"]]).variant_for(sub) for sub in subs)
    if encoder.kinds and decoder.kinds:
        return None
    depth_key = lambda arch, sub: next((k for k in arch.num_layers_keys if config_entry(sub, k)), arch.num_layers_keys[0])
    return _composed(encoder, decoder, config["model_type"], depth_key(encoder, subs[0]), depth_key(decoder, subs[1]))


@cache
def _composed(encoder: Architecture, decoder: Architecture, wrapper: str, encoder_depth: str,
              decoder_depth: str) -> Architecture:
    """The table of `wrapper`, which saves its encoder (a base model, without its family's base_prefix) under
    encoder. and its decoder (a causal LM, whose cross-attention reads the encoder's output as its own table says)
    under decoder.; enc_to_dec_proj, which maps the encoder's output to the decoder's width where they differ, is
    inner. Each stack is a part, whose depth its sub-config's key gives; the head, its tying, the model's
    width and norm_gain_offset are the decoder's (the encoder's norms carry their own where it differs)."""
    def mover(prefix: str, base: str):
        def move(template: str | None) -> str | None:  # None where a base model has no such tensor
            if template is None or not template.startswith(base):
                return None
            return prefix + template[len(base):]
        return move

    sides = ((encoder, mover("encoder.", encoder.base_prefix)), (decoder, mover("decoder.", "")))

    def moved(arch: Architecture, move, specs: dict) -> dict:  # the encoder's norms keep its gain offset
        specs = _renamed(specs, move)
        if arch is decoder or encoder.norm_gain_offset == decoder.norm_gain_offset:
            return specs
        return {t: replace(s, gain_offset=encoder.norm_gain_offset) if s and s.role in GAIN_ROLES
                and s.gain_offset is None else s for t, s in specs.items()}

    tensors = {t: s for arch, move in sides for t, s in moved(arch, move, arch.tensors).items()}
    tensors["enc_to_dec_proj.weight"] = TensorSpec("inner", optional=True)
    tensors["enc_to_dec_proj.bias"] = TensorSpec("inner", optional=True)
    layer_tensors = {}
    for arch, move in sides:
        for layer, overlay in arch.layer_tensors.items():
            layer_tensors.setdefault(layer, {}).update(moved(arch, move, overlay))
    kinded, move = next(((arch, move) for arch, move in sides if arch.kinds), (None, None))
    leading = lambda arch, move: tuple(filter(None, (move(lead) for p in arch.parts for lead in p.leading)))
    parts = (Part("encoder", ("encoder.",), f"encoder.{encoder_depth}", leading(*sides[0])),
             Part("decoder", ("decoder.", "enc_to_dec_proj."), f"decoder.{decoder_depth}", leading(*sides[1])))
    return Architecture(
        name=wrapper, inferred=False, variant=f"{encoder.label} encoder, {decoder.label} decoder",
        num_layers_keys=(f"decoder.{decoder_depth}",),
        hidden_size_keys=tuple(f"decoder.{k}" for k in decoder.hidden_size_keys),
        tie_key=decoder.tie_key and f"decoder.{decoder.tie_key}", tied_default=decoder.tied_default,
        norm_gain_offset=decoder.norm_gain_offset,
        norm_type="layer_norm" if "layer_norm" in (encoder.norm_type, decoder.norm_type) else "rms_norm",
        normed_residual=encoder.normed_residual or decoder.normed_residual,
        gainless_norms=encoder.gainless_norms or decoder.gainless_norms,
        unloaded=tuple(filter(None, (move(p) for arch, move in sides for p in arch.unloaded))),
        notes=_composed.__doc__.replace("`wrapper`", wrapper),
        unrotatable="its encoder's and decoder's residual streams are two streams joined by cross-attention, "
                    "which one turn of one stream does not describe",
        tensors=tensors, layer_tensors=layer_tensors, parts=parts,
        kinds=kinded.kinds if kinded else (), kind_tensors={k: moved(kinded, move, o) for k, o in kinded.kind_tensors.items()}
        if kinded else {})


def known_architectures() -> list[str]:
    """Family names with a role table, sorted."""
    return list(_tables())
