"""Recipe + model headers -> the list of output tensors, each with its inputs and bound parameters.

Planning reads only config.json files and safetensors headers, so every shape, layer range and
parameter problem is found before a single tensor is read.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from seme import architectures
from seme.architectures import modules
from seme.config import Recipe, Slice, evaluate
from seme.errors import SemeError
from seme.io.model import ADAPTER_CONFIG, ModelFolder
from seme.io.safetensors_file import DTYPE_SIZES, TORCH_NAMES
from seme.methods import registry

FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
CODE_NAMES = {code: name for name, code in TORCH_NAMES.items()}


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: read `inputs` (model index, tensor name), merge, write as `name`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code of the output
    inputs: tuple[tuple[int, str], ...]
    base_index: int | None  # position of the base within `inputs`
    params: dict  # bound method parameters (see registry.bind)
    compute_dtype: str | None  # torch dtype name the inputs are cast to before merging, or None
    copy: bool = False  # non-float tensor: copied from the first input, not merged
    remap_rows: bool = False  # rows are tokens: move them to the output vocabulary first (Plan.vocabulary)
    # with remap_rows: the model (index) whose row a token takes in the models that lack it, where several others
    # have it: the slice's base model, as in mergekit; None (no base model): the mean of theirs
    remap_base: int | None = None
    token_columns: bool = False  # with remap_rows: its columns are the tokens, not its rows ([k, V])
    derived: tuple | None = None  # SeMe: per input, how it is built (seme.semantic.pipeline.Derived) or None

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Plan:
    recipe: Recipe
    models: list[ModelFolder]  # indexed by TensorTask.inputs
    tasks: list[TensorTask]
    config: dict  # the output config.json
    tokenizer_model: ModelFolder
    num_layers: int
    archs: list
    semantic: object = None  # seme.semantic.pipeline.SemanticPlan for SeMe merges
    chat_template: str | None = None  # the template to write into the tokenizer files
    vocabulary: object = None  # seme.vocabulary.Remap where the models' vocabularies must be re-mapped

    @property
    def input_bytes(self) -> int:
        return sum(self.models[m].tensors[n].nbytes for t in self.tasks for m, n in t.inputs)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


def make_plan(recipe: Recipe) -> Plan:
    method = registry.get(recipe.merge_method)
    models = [ModelFolder.open(ref, recipe.hub_names) for ref in recipe.models]
    for m in models:
        if m.adapter_beside:
            warnings.warn(f"{m.name} keeps a LoRA adapter beside its weights ({ADAPTER_CONFIG}); its weights are "
                          f"merged without it and the output has none (name it as {m.name}+ADAPTER to apply it)")
    index = {m.ref: i for i, m in enumerate(models)}
    archs = [architectures.for_config(m.config, m.tensors) for m in models]
    first_slice = recipe.slices[0]
    ref_path = recipe.reference
    ref = index[ref_path]
    arch = archs[ref]
    tied = arch.tied(models[ref].config)
    source = ref_path if recipe.tokenizer_source in (None, "base", "union") else recipe.tokenizer_source
    tokenizer = models[index[source]] if source in index else ModelFolder.open(source, recipe.hub_names)
    remap = None
    if recipe.tokenizer_source is not None:
        from seme import vocabulary

        remap = vocabulary.plan(recipe.tokenizer_source, recipe.pad_vocabulary_to, models, ref, tokenizer,
                                recipe.token_sources)
    template = _chat_template(recipe, models, tokenizer)
    stacks = _stacks(arch, models[ref])
    if recipe.modules:
        if method.name == "seme":
            raise SemeError("config: seme takes its sources from 'models:', not 'modules:'")
        parts = _module_parts(recipe, models[ref], arch)
        if len(parts) > 1 or len(stacks) > 1:
            return _plan_modules(recipe, method, models, archs, index, ref, parts, stacks, tokenizer, template, remap)
    if method.name == "seme":
        language = [s for s in stacks if not arch.beside_language(s)]
        # an encoder-decoder model, an image (or image-text) encoder; not a table's multimodal decoder beside its
        # towers (GIT's: projected, one language stack), which goes on as multimodal models do
        if arch.parts and not (arch.projected and len(language) == 1):
            raise SemeError(f"SeMe: {models[ref].name} is no decoder-only language model with a causal LM head "
                            f"({arch.name}, of modules {', '.join(p.name for p in arch.parts)}: "
                            f"{', '.join(arch.rotation_obstacles())}); SeMe aligns those: merge it with another method")
        if len(language) > 1 or (len(stacks) > 1 and not (arch.settings_key or arch.projected)):
            raise SemeError(f"SeMe: {models[ref].name} has several layer stacks ({_describe(stacks)}); SeMe aligns "
                            f"language models of one stack, and multimodal models whose language model has a "
                            f"role table ({', '.join(architectures.known_architectures())}): merge it with "
                            f"another method")
        if remap is not None:
            raise SemeError("config: seme maps the sources' vocabularies to the pivot's itself: "
                            "drop tokenizer_source / tokenizer")
        return _plan_seme(recipe, method, models, archs, index, tokenizer, template)

    if len(stacks) > 1:
        return _plan_stacks(recipe, method, models, archs, index, ref, stacks, tokenizer, template, remap)

    def layer_range(source):
        n = model_depth(archs[index[source.model]], models[index[source.model]])
        if source.layer_range is None:
            return 0, n
        if source.layer_range[1] > n:
            raise SemeError(f"layer_range {list(source.layer_range)} is out of bounds for "
                            f"{models[index[source.model]].name} ({n} layers)")
        return source.layer_range

    for sl in recipe.slices:
        spans = {s.model: layer_range(s) for s in sl.sources}
        depths = {hi - lo for lo, hi in spans.values()}
        if len(depths) > 1:
            detail = ", ".join(f"{models[index[m]].name}: {hi - lo}" for m, (lo, hi) in spans.items())
            raise SemeError(f"models of different depths cannot be merged layer by layer ({detail}); "
                            f"select equal layer ranges with 'slices'")

    builder = _Builder(recipe, method, models, archs, index, tied, remap)
    trailing = trailing_layers(arch, models[ref])
    added_later = set(trailing)  # by _add_trailing
    ref_names = [n for n in models[ref].tensors if n not in added_later]
    # the embeddings, and the norms of the stream before the first layer (BERT's, bloom's): from the first slice
    # (and what its parts' `leading` name: a vision tower's patch embedding and class token); the norms after the
    # last layer, with the heads, from the last
    pre = [n for n in ref_names if _layer(arch, n) is None
           and (_role(arch, n) in ("embedding", "position_embedding") or _leading_norm(arch, n)
                or arch.leads_declared(n))]
    post = [n for n in ref_names if _layer(arch, n) is None and n not in pre]
    head = next((name for name, spec in arch.tensors.items() if spec.role == "lm_head"), None)
    if not tied and head and not arch.tensors[head].optional and not any(_role(arch, n) == "lm_head" for n in ref_names):
        post.append(head)  # an untied output needs a head even if the reference stored none (unless its class has
        # none: an encoder's classifier)

    for name in pre:
        builder.add(name, {s.model: name for s in first_slice.sources}, first_slice, t=0.0)
    layer_sources = _add_layers(builder, recipe.slices, layer_range)
    ref_depth = model_depth(arch, models[ref])
    _check_layer_blocks(arch, ref_names, layer_sources, ref_depth)
    _check_layer_tensors(builder, ref, layer_sources, ref_depth)
    last_slice = recipe.slices[-1]
    trailing_left_out = _add_trailing(builder, ref, trailing, last_slice, len(layer_sources))
    for name in post:
        if _role(arch, name) == "lm_head" and tied:
            continue  # tied heads stay tied: the output has no separate lm_head
        builder.add(name, {s.model: name for s in last_slice.sources}, last_slice, t=0.0)

    config = _output_config(models, archs, ref, layer_sources)
    if trailing_left_out:
        config.update({key: 0 for key in TRAILING_COUNT_KEYS if key in config})
    if remap is not None:
        config = remap.config(config)
    _set_output_dtype(config, recipe, builder.tasks)
    return Plan(recipe, models, builder.tasks, config, tokenizer, len(layer_sources), archs, chat_template=template,
                vocabulary=remap)


def _add_layers(builder, slices, layer_range, stack: str | None = None) -> list[tuple[int, int]]:
    """Add the output layers of `slices` (layers of the stack named `stack`, or of the models' one
    stack) to `builder`, renumbered from 0; `layer_range(source)` is a source's (start, end). Returns
    the (model index, source layer) of each output layer."""
    layer_sources = []
    layers_of: dict[int, dict[int, list[str]]] = {}  # per lead model: layer -> its tensors (of `stack`)
    for sl in slices:
        spans = [layer_range(s) for s in sl.sources]
        depth = spans[0][1] - spans[0][0]
        lead = builder.index[sl.sources[0].model]
        lead_arch = builder.archs[lead]
        if lead not in layers_of:
            layers_of[lead] = _layer_names(lead_arch, builder.models[lead], stack)
        for offset in range(depth):
            t = offset / (depth - 1) if depth > 1 else 1.0
            lead_layer = spans[0][0] + offset
            out_layer = len(layer_sources)
            for name in layers_of[lead].get(lead_layer, ()):
                names_in = {s.model: _rename(builder.archs[builder.index[s.model]], name, span[0] + offset)
                            for s, span in zip(sl.sources, spans)}
                builder.add(_rename(lead_arch, name, out_layer), names_in, sl, t)
            layer_sources.append((lead, lead_layer))
    return layer_sources


def _layer_names(arch, model: ModelFolder, stack: str | None = None) -> dict[int, list[str]]:
    """The model's per-layer tensors (of the stack named `stack`, or of its one stack), by layer."""
    found: dict[int, list[str]] = {}
    for name in model.tensors:
        position = _position(arch, name)
        if position is not None and stack in (None, position[0]):
            found.setdefault(position[1], []).append(name)
    return found


def _check_layer_blocks(arch, names, layer_sources, depth: int, where: str = "") -> None:
    """Tensors that pack a block per layer (Gemma's per-layer token tables) are merged whole: their
    blocks fit the output only where its layer i is layer i of a source, for each of the `depth`; a family with
    fixed_layers keeps every layer in place."""
    if [layer for _, layer in layer_sources] == list(range(depth)):
        return
    if arch.fixed_layers:
        raise SemeError(f"{where}slices move, drop or repeat layers of {arch.name}, whose layers must stay in place: "
                        f"{arch.fixed_layers}")
    packed = [n for n in names if arch.role(n) is not None and arch.role(n).layer_blocks is not None]
    if packed:
        raise SemeError(f"{where}{packed[0]} packs a block for each of its {depth} layers: slices that move or drop "
                        f"layers would leave it with the old layers' blocks; keep every layer in place")
    # A layer whose tensors are its own (ModernBERT's first, without an attention norm) stays where it is.
    for out, (_, layer) in enumerate(layer_sources):
        own = next((i for i in (out, layer) if i in arch.layer_tensors), None)
        if own is not None and out != layer:
            raise SemeError(f"{where}slices put layer {layer} at layer {out}, but {arch.name}'s layer {own} has tensors "
                            f"unlike the others' (seme/architectures/data/{arch.name}.json): keep it in place")


def _check_layer_tensors(builder, ref: int, layer_sources, depth: int, stack: str | None = None,
                         where: str = "") -> None:
    """Where a model's layers differ in their tensors by an index rule of its config (DeepSeek's and GLM-4.5's dense
    layers below first_k_dense_replace, then experts), the output's layer i must have the tensors the reference's
    layer i has (its last layer's, past its depth), as the output keeps that config: a moved layer of another kind
    would load with tensors missing and others unused. Kinds that a config lists per layer follow slices
    (_relayered), as do those a table binds to a layer's index (_check_layer_blocks)."""
    arch, config = builder.archs[ref], builder.models[ref].config
    if [layer for _, layer in layer_sources] == list(range(depth)) or arch.layer_kinds_key or _lists_layers(config, depth):
        return
    kinds: dict[int, dict[int, frozenset[str]]] = {}  # per model: layer -> its tensors' templates

    def kind(m: int, layer: int) -> frozenset[str]:
        if m not in kinds:
            a = builder.archs[m]
            kinds[m] = {layer: frozenset(_rename(a, n, -1) for n in names)
                        for layer, names in _layer_names(a, builder.models[m], stack).items()}
        return kinds[m].get(layer, frozenset())

    if len({kind(ref, i) for i in range(depth)}) == 1:  # layers all alike
        return
    for out, (m, layer) in enumerate(layer_sources):
        expected, got = kind(ref, min(out, depth - 1)), kind(m, layer)
        if got != expected:
            differ = sorted(got ^ expected)[0].replace(".-1.", ".N.")
            raise SemeError(f"{where}slices put layer {layer} of {builder.models[m].name} at layer {out}, where the "
                            f"output's config has a layer of another kind (their tensors differ: {differ}); keep "
                            f"layers of each kind in their places")


def _lists_layers(config: dict, depth: int) -> bool:
    """Whether a config (or one of its sub-configs) keeps a list with an entry per layer, which follows slices."""
    for key, value in config.items():
        if isinstance(value, dict) and _lists_layers(value, depth):
            return True
        per_layer = _per_layer_list(key, value)
        if isinstance(per_layer, list) and len(per_layer) == depth:
            return True
    return False


# Config keys that count the layers after the last (DeepSeek-V3's and GLM-4.5's multi-token prediction).
TRAILING_COUNT_KEYS = ("num_nextn_predict_layers",)


def model_depth(arch, model: ModelFolder) -> int:
    """`model`'s number of layers; a refusal of its config's depth names the model's config.json."""
    return arch.num_layers(model.config, os.path.join(model.path, "config.json"))


def trailing_layers(arch, model: ModelFolder) -> list[str]:
    """Tensors that transformers does not run: of the layers a checkpoint stores after its last one
    (DeepSeek-V3's and GLM-4.5's multi-token prediction) and of the modules its role table says
    transformers does not load (Qwen3-Next's mtp.*)."""
    depth = model_depth(arch, model)
    layers = {n: _layer(arch, n) for n in model.tensors}
    return [n for n, layer in layers.items() if arch.unloaded_module(n)
            or (layer is not None and layer >= depth and not arch.beside_language(n))]


def _add_trailing(builder, ref: int, names: list[str], sl: Slice, depth: int) -> bool:
    """The reference's trailing layers (its tensors `names`, trailing_layers'), after the output's
    `depth` layers: merged index for index from the sources of `sl` where every one has them, else the
    reference's copied. Returns whether they were left out instead (the reference's rows are in
    another vocabulary)."""
    models, archs, index = builder.models, builder.archs, builder.index
    if not names:
        return False
    n_ref = model_depth(archs[ref], models[ref])
    past = {n: _layer(archs[ref], n) - n_ref for n in names  # 0 for the first layer after the last
            if not archs[ref].unloaded_module(n)}

    def named(m: int, n: str, layers: int) -> str:
        """Trailing tensor `n` where model `m` has `layers` layers: an unloaded module keeps its name."""
        return _rename(archs[m], n, layers + past[n]) if n in past else n

    inputs = {n: {} for n in names}
    lacking = []
    for s in sl.sources:
        m = index[s.model]
        n_m = model_depth(archs[m], models[m])
        for n in names:
            inputs[n][s.model] = named(m, n, n_m)
        if any(inputs[n][s.model] not in models[m].tensors for n in names):
            lacking.append(models[m].name)
    out = {n: named(ref, n, depth) for n in names}
    if not lacking:
        for n in names:
            builder.add(out[n], inputs[n], sl, t=1.0)
        return False
    what = f"the layers after the last ({_name_layers(archs[ref], names)})"
    who = f"{', '.join(lacking)} {'lacks' if len(lacking) == 1 else 'lack'} them"
    if builder.remap is not None and any(_role(archs[ref], n) in architectures.VOCAB_ROLES for n in names):
        warnings.warn(f"{what} are left out: {who}, and the reference's rows follow its own vocabulary")
        return True
    warnings.warn(f"{what} are the reference's: {who}")
    for n in names:
        builder.copy(out[n], ref, n)
    return False


def _name_layers(arch, names) -> str:
    """The layers (model.layers.61) and the unloaded modules (mtp.*) that hold `names`."""
    def where(n):
        module = arch.unloaded_module(n)
        return module + "*" if module else "".join(map(str, _position(arch, n)))

    return ", ".join(sorted({where(n) for n in names}))


def _stacks(arch, model: ModelFolder) -> dict[str, int]:
    """The model's layer stacks (a decoder's layers, a vision tower's blocks) by name prefix, with
    their depths."""
    found: dict[str, set[int]] = {}
    for name in model.tensors:
        position = _position(arch, name)
        if position is not None:
            found.setdefault(position[0], set()).add(position[1])
    return {stack: max(layers) + 1 for stack, layers in found.items()}


def _describe(stacks: dict[str, int]) -> str:
    return ", ".join(f"{stack}* ({depth} layers)" for stack, depth in stacks.items()) or "none"


def _plan_stacks(recipe, method, models, archs, index, ref, stacks, tokenizer, template, remap) -> Plan:
    """A model of several layer stacks (a multimodal model: language decoder, vision tower) merged
    whole, tensor by tensor; a gradient runs over each stack's own layers."""
    reference = models[ref]
    where = _describe(stacks)
    if recipe.uses_slices:
        named = f" ({', '.join(p.name for p in archs[ref].parts)})" if archs[ref].parts else ""
        raise SemeError(f"{reference.name} has several layer stacks ({where}), which one layer_range cannot "
                        f"select: merge it whole with 'models:', or module by module with 'modules:'{named}")
    builder = _Builder(recipe, method, models, archs, index, tied=False, remap=remap)
    stacks_of = [stacks if i == ref else _stacks(archs[i], m) for i, m in enumerate(models)]
    depth = _add_whole(builder, recipe.slices[0], list(reference.tensors), stacks_of, ref)
    config = dict(reference.config) if remap is None else remap.config(reference.config)
    _set_output_dtype(config, recipe, builder.tasks)
    return Plan(recipe, models, builder.tasks, config, tokenizer, depth, archs, chat_template=template,
                vocabulary=remap)


def _add_whole(builder, sl, names, stacks_of, ref, part: str | None = None, where: str = "") -> int:
    """The reference's tensors `names` merged whole from the models of `sl`, whose layer stacks (those
    of `part`, if given) must be the reference's; a gradient runs over each stack's own layers.
    Returns the deepest stack's depth."""
    arch = builder.archs[ref]

    def own(m):
        return {stack: d for stack, d in stacks_of[m].items() if part is None or arch.part_of(stack) == part}

    stacks = own(ref)
    for s in sl.sources:
        m = builder.index[s.model]
        if own(m) != stacks:
            raise SemeError(f"{where}{builder.models[m].name} has layer stacks {_describe(own(m))}, "
                            f"{builder.models[ref].name} {_describe(stacks)}: models merged whole must have the "
                            f"same layers")
    for n in names:
        position = _position(builder.archs[ref], n)
        layers = stacks.get(position[0], 1) if position else 1
        t = 0.0 if not position else position[1] / (layers - 1) if layers > 1 else 1.0
        builder.add(n, {s.model: n for s in sl.sources}, sl, t)
    return max(stacks.values(), default=0)


def _module_parts(recipe: Recipe, reference: ModelFolder, arch) -> dict[str, str]:
    """The reference's parts (its family's, else seme.architectures.modules'), in its tensors' order,
    each with the `modules:` name that selects it; every part must be selected, once."""
    parts = dict.fromkeys(arch.part_of(name) for name in reference.tensors)
    chosen: dict[str, str] = {}
    for name in recipe.modules:
        part = modules.canonical(name, parts)
        if part is None:
            known = ", ".join(modules.SINGLE_NAMES if len(parts) == 1 else parts)
            raise SemeError(f"modules.{name}: {reference.name} has no module '{name}' (its modules: {known})")
        if part in chosen:
            raise SemeError(f"modules.{name}: the same module as modules.{chosen[part]}")
        chosen[part] = name
    missing = [part for part in parts if part not in chosen]
    if missing:
        raise SemeError(f"modules: {', '.join(missing)} of {reference.name} not listed; list every module "
                        f"(one left out would be missing from the output)")
    return {part: chosen[part] for part in parts}


def _plan_modules(recipe, method, models, archs, index, ref, parts, stacks, tokenizer, template, remap) -> Plan:
    """A model of several parts (Architecture.part_of) merged module by module, as mergekit's `modules:`
    does: each with its own models or slices and parameters. A module given `models:` is merged whole
    (gradients run over each of its stacks' layers); one given `slices:` must have one layer stack,
    whose layers the slices select, as the `slices:` of a language model do."""
    reference = models[ref]
    builder = _Builder(recipe, method, models, archs, index, tied=False, remap=remap)
    config = dict(reference.config) if remap is None else remap.config(reference.config)
    stacks_of = [stacks if i == ref else _stacks(archs[i], m) for i, m in enumerate(models)]
    depth = 0
    for part, name in parts.items():
        where = f"modules.{name}"
        slices = [sl for sl in recipe.slices if sl.module == name]
        names = [n for n in reference.tensors if archs[ref].part_of(n) == part]
        own = {stack: d for stack, d in stacks.items() if archs[ref].part_of(stack) == part}
        if all(s.layer_range is None for sl in slices for s in sl.sources):  # models: the module whole
            depth = max(depth, _add_whole(builder, slices[0], names, stacks_of, ref, part, f"{where}: "))
            continue
        if len(own) != 1:
            raise SemeError(f"{where}: {reference.name}'s {part} has "
                            f"{'no layers' if not own else 'several layer stacks (' + _describe(own) + ')'}: "
                            f"give it 'models:', not 'slices:'")
        config, layers = _add_module_slices(builder, where, part, slices, names, own, ref, stacks_of, config)
        depth = max(depth, layers)
    _set_output_dtype(config, recipe, builder.tasks)
    return Plan(recipe, models, builder.tasks, config, tokenizer, depth, archs, chat_template=template,
                vocabulary=remap)


def _add_module_slices(builder, where, part, slices, names, own, ref, stacks_of, config) -> tuple[dict, int]:
    """A module of one layer stack (`own`) given `slices:`: its layers as the slices select them,
    its leading loose tensors (embeddings; an encoder-decoder part's `leading`) from the first slice's
    models (mergekit's pre-weights) and its other loose tensors (final norms, heads) from the last slice's. Returns the output config, with the part's
    depth and per-layer lists rewritten where they changed, and the module's depth."""
    models, archs, index = builder.models, builder.archs, builder.index
    (stack, ref_depth), = own.items()

    def layer_range(source):
        m = index[source.model]
        n = stacks_of[m].get(stack)
        if n is None or source.layer_range[1] > n:
            raise SemeError(f"{where}: layer_range {list(source.layer_range)} is out of bounds for "
                            f"{models[m].name} ({n or 0} layers in {stack}*)")
        return source.layer_range

    loose = [n for n in names if _position(archs[ref], n) is None]
    pre = [n for n in loose if archs[ref].leads(n)]
    for n in pre:
        builder.add(n, {s.model: n for s in slices[0].sources}, slices[0], t=0.0)
    layer_sources = _add_layers(builder, slices, layer_range, stack)
    _check_layer_blocks(archs[ref], names, layer_sources, ref_depth, f"{where}: ")
    _check_layer_tensors(builder, ref, layer_sources, ref_depth, stack, f"{where}: ")
    for n in loose:
        if n not in pre:
            builder.add(n, {s.model: n for s in slices[-1].sources}, slices[-1], t=0.0)
    if layer_sources == [(ref, layer) for layer in range(ref_depth)]:
        return config, ref_depth
    declared = archs[ref].depth_key(part)  # a declared part's: T5's depths may be equal (no search), a tower's dotted
    own_keys = archs[ref].num_layers_keys if part == modules.TEXT else ()  # the language model's, by its table

    def depth_settings(config: dict, depth: int | None):
        return ((declared and architectures.config_entry(config, declared))
                or modules.depth_settings(config, part, depth, own_keys))

    found = depth_settings(config, ref_depth)
    if found is None:
        raise SemeError(f"{where}: config.json of {models[ref].name} has no depth of {ref_depth} for its {part} "
                        f"to change")
    settings, key = found
    sources = [depth_settings(m.config, stacks_of[i].get(stack)) for i, m in enumerate(models)]
    relayered = _relayered(settings, key, layer_sources, [f[0] if f else {} for f in sources],
                           _listed_layers_key(archs[ref]) if part == modules.TEXT else "", own_keys)
    return _replaced(config, settings, relayered), len(layer_sources)


def _replaced(config: dict, old: dict, new: dict) -> dict:
    """`config` with its settings `old` (itself, or a sub-config at any depth: T5Gemma 2's encoder.text_config)
    replaced by `new`."""
    if config is old:
        return new
    for key, value in config.items():
        replaced = _replaced(value, old, new) if isinstance(value, dict) else value
        if replaced is not value:
            return {**config, key: replaced}
    return config


def _chat_template(recipe: Recipe, models: list[ModelFolder], tokenizer: ModelFolder) -> str | None:
    """The recipe's chat template resolved against the models, checked to have a tokenizer to go in."""
    if recipe.chat_template is None:
        return None
    import json

    from seme import chat_template

    files = tokenizer.tokenizer_files()
    if "tokenizer_config.json" not in files and "tokenizer.json" not in files:
        raise SemeError(f"config: chat_template: the tokenizer source {tokenizer.path} has no tokenizer files to hold it")
    if "tokenizer_config.json" in files:  # the template goes into it after the merge: read it now
        path = os.path.join(tokenizer.path, "tokenizer_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError
        except (OSError, ValueError):
            raise SemeError(f"config: chat_template: {path} is not a readable JSON object") from None
    return chat_template.resolve(recipe.chat_template, [m.path for m in models])


def _plan_seme(recipe, method, models, archs, index, tokenizer, template) -> Plan:
    """SeMe keeps the pivot's architecture: one task per pivot tensor, each source input derived
    (aligned, interpolated across layers, vocabulary-mapped) by seme.semantic.pipeline."""
    from seme.semantic import pipeline

    sp = pipeline.plan_sources(recipe, method, models, archs, index)
    pivot = models[sp.pivot]
    # A multimodal model's other parts are merged tensor by tensor, layer for layer.
    others = lambda m: {s: d for s, d in _stacks(archs[m], models[m]).items() if archs[m].beside_language(s)}
    pivot_others = others(sp.pivot)
    for m in sp.sources:
        if others(m) != pivot_others:
            raise SemeError(f"SeMe: {models[m].name} has layer stacks {_describe(others(m))} beside its language "
                            f"model, the pivot {_describe(pivot_others)}: SeMe matches only the language "
                            f"models' layers")
    trailing = set(trailing_layers(archs[sp.pivot], pivot))
    if trailing:  # the merged layers are in the pivot's coordinates, which the pivot's own extra layers read
        warnings.warn(f"the layers after the last ({_name_layers(archs[sp.pivot], trailing)}) are the pivot's")
    tasks = []
    for name, info in pivot.tensors.items():
        dtype = TORCH_NAMES[recipe.out_dtype or recipe.dtype] if (recipe.out_dtype or recipe.dtype) else info.dtype
        if info.dtype not in FLOAT_CODES or _role(archs[sp.pivot], name) == "buffer" or name in trailing:
            cast = (recipe.out_dtype or recipe.dtype) if name in trailing else None
            tasks.append(_copy_task(name, sp.pivot, name, info, cast))
            continue
        derived = pipeline.derive(sp, models, archs, name)
        supplied = {}
        for param in method.params:
            value = _resolve(param.name, [recipe.parameters], name, 0.0)
            if value is not None:
                supplied[param.name] = value
        params = registry.bind(method, supplied, 1 + len(derived), 0, f"tensor '{name}'")
        inputs = ((sp.pivot, name),) + tuple((d.model, d.terms[0][0]) for d in derived)
        tasks.append(TensorTask(name, info.shape, dtype, inputs, 0, params, recipe.dtype, derived=(None,) + derived))
    sp.report_drift = pipeline.reports_drift(sp, models, tasks)
    config = dict(pivot.config)
    if recipe.out_dtype or recipe.dtype:
        _set_dtype(config, recipe.out_dtype or recipe.dtype)
    depth = model_depth(archs[sp.pivot], pivot)
    return Plan(recipe, models, tasks, config, tokenizer, depth, archs, sp, template)


def _copy_task(out_name: str, model: int, name: str, info, dtype_out: str | None) -> TensorTask:
    """`name` of `model` (header `info`) written as it is, cast to `dtype_out` if given and a float."""
    code = TORCH_NAMES[dtype_out] if dtype_out and info.dtype in FLOAT_CODES else info.dtype
    return TensorTask(out_name, info.shape, code, ((model, name),), None, {}, None, copy=True)


def _set_output_dtype(config: dict, recipe: Recipe, tasks: list[TensorTask]) -> None:
    """The recipe's output dtype, or else the promotion of the merged tensors' dtypes."""
    merged = [t.dtype for t in tasks if not t.copy]
    _set_dtype(config, recipe.out_dtype or recipe.dtype or CODE_NAMES[_promote_codes(merged or ["F32"])])


def _set_dtype(config: dict, dtype: str) -> None:
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "dtype":
            config[key] = dtype


def _output_config(models, archs, ref: int, layer_sources) -> dict:
    """The reference config with the new depth; per-layer lists (e.g. layer_types) follow the layers."""
    config, arch = models[ref].config, archs[ref]
    settings = arch.settings(config)  # a multimodal model's language model's (Emu3's, its one layer stack)
    found = next(k for k in arch.num_layers_keys if architectures.config_entry(settings, k))
    if settings is not config:
        found = f"{arch.settings_key}.{found}"
    section, _, key = found.rpartition(".")  # a sub-config's depth (CLIPForImageClassification's vision_config)
    listed = _listed_layers_key(arch)
    if not section:
        return _relayered(config, key, layer_sources, [m.config for m in models], listed, arch.num_layers_keys)
    return {**config, section: _relayered(config[section], key, layer_sources, [m.config.get(section, {}) for m in models],
                                          listed, arch.num_layers_keys)}


def _listed_layers_key(arch) -> str:
    """The config key that lists the indices of the layers of a kind (Mllama's cross_attention_layers), if any."""
    return arch.layer_kinds_key if arch.listed_kind else ""


def _relayered(settings: dict, depth_key: str, layer_sources, sources: list[dict], listed: str = "",
               aliases: tuple[str, ...] = ()) -> dict:
    """`settings` (a config, or one part of it) for the output's layers: the depth under `depth_key`, and under
    those of the table's depth keys (`aliases`) that hold the same depth (GLM-4's remote-code config has num_layers,
    which its code reads, and num_hidden_layers, which vLLM maps onto it), and per-layer lists that follow the
    layers, each entry from `sources[m]` (the same settings of model m) for a layer of model m, and the list of
    layer indices under `listed`, of the output's layers that are listed layers of their model. The depth may be
    a per-layer list itself (nemotron_h's layers_block_type, where its config has no layer count)."""
    depth = _depth(settings[depth_key])
    out = dict(settings)
    for key, value in settings.items():
        per_layer = _per_layer_list(key, value)
        if isinstance(per_layer, list) and len(per_layer) == depth and depth > 0 and key != listed:
            entries = [_per_layer(sources[m], depth_key, key, per_layer, layer) for m, layer in layer_sources]
            out[key] = "".join(entries) if isinstance(value, str) else entries
    if isinstance(settings.get(listed), list):
        out[listed] = [i for i, (m, layer) in enumerate(layer_sources) if layer in (sources[m].get(listed) or ())]
    if not isinstance(settings[depth_key], list):
        for key in {depth_key, *(k for k in aliases if k in settings and settings[k] == settings[depth_key])}:
            out[key] = len(layer_sources)
    return out


def _depth(value) -> int | None:
    return len(value) if isinstance(value, list) else value


# Config strings of one character per layer (Nemotron-H's older configs: "M-M*-..."; transformers
# prefers the pattern to num_hidden_layers).
LAYER_PATTERN_KEYS = ("hybrid_override_pattern",)


def _per_layer_list(key: str, value):
    return list(value) if key in LAYER_PATTERN_KEYS and isinstance(value, str) else value


def _per_layer(settings: dict, depth_key: str, key: str, fallback: list, layer: int):
    """Layer `layer`'s entry of a per-layer config list, from the settings of the model that supplies
    the layer."""
    value = _per_layer_list(key, settings.get(key))
    if isinstance(value, list) and len(value) == _depth(settings.get(depth_key)):
        return value[layer]
    return fallback[min(layer, len(fallback) - 1)]


def _leading_norm(arch, name) -> bool:
    role = arch.role(name)
    return role is not None and role.role in ("norm", "norm_bias") and not role.after_layers


def _role(arch, name):
    role = arch.role(name)
    return role.role if role else None


def _layer(arch, name) -> int | None:
    """Layer index of a tensor; names missing from the role table fall back to the name pattern."""
    position = _position(arch, name)
    return position[1] if position else None


def _position(arch, name) -> tuple[str, int] | None:
    """(layer stack's name prefix, layer index) of a per-layer tensor, from the role table or else
    the name pattern; a module that transformers does not load is no layer stack of the model."""
    if arch.unloaded_module(name):
        return None
    role = arch.role(name)
    if role:
        return None if role.layer is None else (role.template[:role.template.index("{layer}")], role.layer)
    m = architectures.LAYER_PATTERN.search(name)
    return (name[:m.start(1)], int(m.group(1))) if m else None


def _rename(arch, name: str, layer: int) -> str:
    if arch.role(name):
        return arch.rename_layer(name, layer)
    m = architectures.LAYER_PATTERN.search(name)
    return name[:m.start(1)] + str(layer) + name[m.end(1):]


class _Builder:
    def __init__(self, recipe, method, models, archs, index, tied, remap=None):
        self.recipe, self.method, self.models, self.archs, self.index = recipe, method, models, archs, index
        self.remap = remap
        self.tasks: list[TensorTask] = []
        self.seen: set[str] = set()
        self.dropped_heads: list[str] = []
        if tied:
            self.dropped_heads = [m.name for m, a in zip(models, archs)
                                  if not a.tied(m.config) and any(_role(a, n) == "lm_head" for n in m.tensors)]
            if self.dropped_heads:
                warnings.warn(f"the output ties its LM head to the embeddings (like the reference model), "
                              f"so the separate LM heads of {', '.join(self.dropped_heads)} are not merged")

    def _find(self, model: int, name: str) -> str:
        """The name under which model `model` stores `name` (a tied LM head is its embedding)."""
        folder, arch = self.models[model], self.archs[model]
        if name in folder.tensors:
            return name
        role = arch.role(name)
        if role and role.tied_to and role.tied_to in folder.tensors:
            return role.tied_to
        raise SemeError(f"tensor '{name}' is missing from {folder.name}")

    def copy(self, out_name: str, model: int, name: str) -> None:
        """`name` of `model` written as it is, in the recipe's output dtype (if a float)."""
        self.seen.add(out_name)
        self.tasks.append(_copy_task(out_name, model, name, self.models[model].tensors[name],
                                     self.recipe.out_dtype or self.recipe.dtype))

    def add(self, out_name: str, names_in: dict, sl: Slice, t: float) -> None:
        if out_name in self.seen:
            raise SemeError(f"output tensor '{out_name}' would be written twice (overlapping slices?)")
        self.seen.add(out_name)
        recipe, method = self.recipe, self.method
        base = sl.base_model or recipe.base_model
        sources = sl.sources
        inputs = tuple((self.index[s.model], self._find(self.index[s.model], names_in[s.model])) for s in sources)
        infos = [self.models[m].tensors[n] for m, n in inputs]
        found = self.archs[inputs[0][0]].role(inputs[0][1])
        role = found.role if found else None
        remapped = (self.remap is not None  # not a vision embedding
                    and modules.is_language(self.archs[inputs[0][0]].part_of(inputs[0][1]))
                    and role in architectures.VOCAB_ROLES)
        columns = role == "token_table" and found.layout == "in_out"  # a column per token (MobileBERT's head's)
        # its tokens' axis (BART's bias: [1, V])
        axis = len(infos[0].shape) - 1 if role == "lm_head_bias" or columns else 0
        shapes = {info.shape[:axis] + info.shape[axis + 1:] if remapped else info.shape for info in infos}
        if remapped:
            from seme.vocabulary import vocab_size

            for (m, name), info in zip(inputs, infos):
                if max(self.remap.rows[m]) >= info.shape[axis]:
                    raise SemeError(f"tensor '{name}' of {self.models[m].name} has {info.shape[axis]} rows, fewer than "
                                    f"its vocabulary's tokens")
                size = vocab_size(self.models[m])
                if role in ("embedding", "lm_head") and size is not None and info.shape[axis] > size:
                    raise SemeError(f"config: tokenizer_source: tensor '{name}' of {self.models[m].name} has "
                                    f"{info.shape[axis]} rows, more than its vocab_size ({size}): re-mapping would "
                                    f"drop the rows past it (Mllama's image token)")
        if len(shapes) > 1:
            detail = ", ".join(f"{list(info.shape)} in {self.models[m].name}" for (m, _), info in zip(inputs, infos))
            hint = ""
            if any(_role(self.archs[m], n) in architectures.VOCAB_ROLES for m, n in inputs):
                hint = " (the vocabularies differ: align them with a common tokenizer first)"
            raise SemeError(f"tensor '{out_name}' has different shapes: {detail}{hint}")
        lead = infos[0]
        floats = [i.dtype in FLOAT_CODES for i in infos]
        if role != "buffer" and any(floats) and not all(floats):  # copying the first would drop the others silently
            detail = ", ".join(f"{info.dtype} in {self.models[m].name}" for (m, _), info in zip(inputs, infos))
            raise SemeError(f"tensor '{out_name}' is a float in some models and not in others ({detail}): "
                            f"it cannot be merged")
        if role == "buffer" or not any(floats):
            self.tasks.append(TensorTask(out_name, lead.shape, lead.dtype, inputs[:1], None, {}, None, copy=True))
            return
        base_index = next((i for i, s in enumerate(sources) if s.model == base), None)
        if method.base == "ignored":
            base_index = None
        where = f"tensor '{out_name}'"
        supplied = {}
        for param in method.params:
            if param.scope == "shared":
                value = _resolve(param.name, [sl.parameters, sl.module_parameters, recipe.parameters], out_name, t)
                if value is not None:
                    supplied[param.name] = value
                continue
            values = []
            for i, s in enumerate(sources):
                if param.scope == "non_base" and i == base_index:
                    continue
                # filters see the input's name in its model's layout, as mergekit's do: a tied model's head is
                # lm_head.weight, though it is read from the embedding
                value = _resolve(param.name, [s.parameters, sl.parameters, sl.module_parameters, recipe.parameters],
                                 names_in[s.model], t)
                if value is None:
                    if param.required:
                        raise SemeError(f"{where}: parameter '{param.name}' has no value for "
                                        f"{os.path.basename(s.model)} (no filter matches)")
                    value = param.default
                values.append(value)
            supplied[param.name] = values
        params = registry.bind(method, supplied, len(inputs), base_index, where)
        compute = recipe.dtype
        dtype_out = recipe.out_dtype or recipe.dtype
        code = TORCH_NAMES[dtype_out] if dtype_out else _promote_codes([i.dtype for i in infos])
        shape = (*lead.shape[:axis], self.remap.size, *lead.shape[axis + 1:]) if remapped else lead.shape
        self.tasks.append(TensorTask(out_name, shape, code, inputs, base_index, params, compute, remap_rows=remapped,
                                     remap_base=self.index[base] if remapped and base else None,
                                     token_columns=remapped and columns))


def _promote_codes(codes) -> str:
    codes = set(codes)
    if len(codes) == 1:
        return codes.pop()
    if codes <= {"F16", "BF16"}:
        return "F32"
    return max(codes, key=["F16", "BF16", "F32", "F64"].index)


def _resolve(name: str, scopes, tensor_name: str, t: float):
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None
