"""The recipe: mergekit's YAML schema, parsed and validated whole before any tensor is read.

Every problem is reported as one `SemeError` line that names the offending key. Unknown keys are
errors (with a did-you-mean), never silently ignored.
"""
from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any

from seme.errors import SemeError
from seme.io.model import ADAPTER_CONFIG
from seme.methods.registry import suggest

DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "random_seed", "name"}
MODULE_KEYS = {"models", "slices", "parameters"}
TOKENIZER_KEYS = {"source", "pad_to_multiple_of", "tokens"}
MODEL_KEYS = {"model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
CONDITION_KEYS = {"value", "filter"}


@dataclass
class _Resolving:
    """What model references resolve against while one recipe is validated (see `validate`)."""

    stages: dict  # stage name -> output folder, in a multi-stage recipe
    hub: dict = field(default_factory=dict)  # found: hub snapshot folder -> the hub name it was given as


_RESOLVING: contextvars.ContextVar[_Resolving] = contextvars.ContextVar("resolving", default=_Resolving({}))


@dataclass(frozen=True)
class Source:
    """One input model of an output slice; `layer_range` None means all of its layers."""

    model: str  # resolved local path
    layer_range: tuple[int, int] | None = None
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    module: str | None = None  # the `modules:` entry it belongs to (None: the recipe has no modules)
    module_parameters: dict = field(default_factory=dict)  # that module's parameters, between the slice's and the recipe's


@dataclass(frozen=True)
class Recipe:
    merge_method: str
    slices: tuple[Slice, ...]
    base_model: str | None
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None  # "base", "union", a resolved model path, or None (not given: the base's, as is)
    random_seed: int
    uses_slices: bool  # False when the recipe listed whole `models` (or `modules`)
    text: str  # the recipe as written, for the model card
    path: str | None = None  # the file it was read from
    chat_template: str | None = None  # as written: 'auto', a built-in name or a template (seme.chat_template)
    pad_vocabulary_to: int | None = None  # tokenizer.pad_to_multiple_of
    # tokenizer.tokens: token -> (source, force); source: ("zero",), ("model", path) for the model's row
    # of that token, or ("model_token", path, token id or token) for a row of the model's own vocabulary
    token_sources: dict = field(default_factory=dict)
    modules: tuple[str, ...] = ()  # the `modules:` names in recipe order; their slices are in `slices`
    hub_names: dict = field(default_factory=dict)  # hub snapshot folder -> the name the recipe gave it
    stage_names: dict = field(default_factory=dict)  # output folder -> name, of a multi-stage recipe's stages

    def written(self, ref: str) -> str:
        """A resolved model reference (a folder, or model+adapter) as the recipe named it: hub
        snapshots and earlier stages' outputs by their names, other folders by their paths."""
        return "+".join(self.stage_names.get(part) or self.hub_names.get(part, part) for part in split_reference(ref))

    @property
    def hub_models(self) -> list[str]:
        """The hub repositories of the models merged (adapters aside), without revisions."""
        found = (self.hub_names.get(split_reference(m)[0]) for m in self.models)
        return list(dict.fromkeys(name.partition("@")[0] for name in found if name))

    @property
    def reference(self) -> str:
        """The model whose architecture (config.json, processor) the output takes: the base model, else
        the first slice's, else that slice's first source."""
        first = self.slices[0]
        return self.base_model or first.base_model or first.sources[0].model

    @property
    def models(self) -> list[str]:
        """Every referenced model, once, in first-mention order."""
        seen = dict.fromkeys(s.model for sl in self.slices for s in sl.sources)
        for extra in (self.base_model, *(sl.base_model for sl in self.slices)):
            if extra:
                seen.setdefault(extra)
        return list(seen)


def load(path_or_text: str | os.PathLike | dict) -> Recipe:
    """Parse a recipe from a YAML file path, YAML text or an already-parsed dict."""
    docs, base_dir, path = documents(path_or_text)
    if len(docs) > 1:
        raise SemeError(f"config holds {len(docs)} recipes (a multi-stage recipe, as mergekit-multimerge takes): "
                        f"merge it with seme.merge or the command line, which run it stage by stage")
    return validate(*docs[0], base_dir, path)


def documents(path_or_text: str | os.PathLike | dict) -> tuple[list[tuple[Any, str]], str, str | None]:
    """The YAML documents of a recipe file or text (several, separated by `---`, in a multi-stage
    recipe), each parsed and with its own text; the folder relative paths start from; the file."""
    import yaml

    base_dir, path = os.getcwd(), None
    if isinstance(path_or_text, dict):
        return [(path_or_text, yaml.safe_dump(path_or_text, sort_keys=False))], base_dir, path
    text = str(path_or_text)
    file = os.path.expanduser(text)
    if "\n" not in text and (os.path.exists(file) or text.endswith((".yml", ".yaml"))):
        if not os.path.exists(file):
            raise SemeError(f"config file not found: {text}")
        if os.path.isdir(file):
            raise SemeError(f"config {text} is a folder, not a recipe file")
        path, base_dir = os.path.abspath(file), os.path.dirname(os.path.abspath(file))
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise SemeError(f"config {path} is not UTF-8 text (a recipe is a YAML file)") from None
        except OSError as e:
            raise SemeError(f"config {path}: cannot read: {e.strerror}") from None
    try:
        nodes = list(yaml.compose_all(text))
        if len(nodes) > 1:  # each document's own text: the model card of its stage holds it
            parts = [text[n.start_mark.index:n.end_mark.index] for n in nodes]
            docs = [(raw, part) for raw, part in ((yaml.safe_load(part), part) for part in parts)
                    if raw is not None] or [(None, text)]  # empty documents (a closing ---) are none
        else:
            docs = [(yaml.safe_load(text), text)]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SemeError(f"config is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if isinstance(docs[0][0], str) and "\n" not in text:  # one word that is no file: a path mistyped
        raise SemeError(f"config file not found: {text}")
    return docs, base_dir, path


def validate(raw: Any, text: str, base_dir: str, path: str | None, stages: dict[str, str] | None = None) -> Recipe:
    """One parsed recipe, validated; `stages` maps the names of earlier stages of a multi-stage
    recipe to the folders they will be merged into, so that models may name them."""
    resolving = _Resolving(stages or {})
    token = _RESOLVING.set(resolving)
    try:
        recipe = _validate(raw, text, base_dir, path)
    finally:
        _RESOLVING.reset(token)
    return dataclasses.replace(recipe, hub_names=resolving.hub,
                               stage_names={folder: name for name, folder in (stages or {}).items()})


def _check_keys(d: Any, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise SemeError(f"{where} must be a mapping, got {type(d).__name__}")
    for key in d:
        if key in allowed:
            continue
        if "parameters" in allowed and key in _parameter_names():
            # A common slip in published recipes (`normalize: true` beside merge_method): mergekit ignores
            # the key there without a word, so its merge took the parameter's default.
            raise SemeError(f"{where}: the parameter {str(key)!r} goes under 'parameters:' (mergekit ignores it "
                            f"here and merges with its default: move it there to set it, or delete it to merge "
                            f"as mergekit did)")
        raise SemeError(f"{where}: unknown key {str(key)!r}{suggest(key, allowed)}")


def _parameter_names() -> set[str]:
    """The parameters of some method, and those recipes still set that mergekit 0.1.5 reads nowhere
    (its README's embed_slerp, for the embeddings of a two-model merge with a tokenizer source)."""
    from seme.methods import registry

    return {p.name for name in registry.names() for p in registry.get(name).params} | {"embed_slerp"}


def _resolve_model(ref: Any, where: str, base_dir: str) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise SemeError(f"{where}: model must be a path string, got {ref!r}")
    resolving = _RESOLVING.get()
    if ref in resolving.stages:  # an earlier stage's output, not merged yet
        return resolving.stages[ref]
    path = os.path.expanduser(ref)
    if "+" in ref and not any(os.path.exists(p) for p in (path, os.path.join(base_dir, path))):
        chunks = ref.split("+")  # a LoRA reference, model+adapter, as mergekit writes it
        if len(chunks) != 2 or not all(chunks):
            raise SemeError(f"{where}: '{ref}' is neither a model nor a model+adapter reference")
        model, adapter = (_resolve_model(chunk, where, base_dir) for chunk in chunks)
        if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
            raise SemeError(f"{where}: {adapter} has no {ADAPTER_CONFIG} (not a LoRA adapter)")
        return join_reference(model, adapter)
    candidates = (path, os.path.join(base_dir, path))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    if any(os.path.isfile(candidate) for candidate in candidates):
        raise SemeError(f"{where}: {ref} is a file; a model is named by its folder ({os.path.dirname(ref) or '.'})")
    snapshot = _hub_snapshot(ref, where)
    if snapshot:
        resolving.hub[snapshot] = ref
        return snapshot
    if ref.startswith(("/", "./", "../", "~")) or ref.split("@")[0].count("/") > 1:  # no Hub repository id
        raise SemeError(f"{where}: model not found: no folder {ref}")
    raise SemeError(f"{where}: model not found: {ref} is neither a local folder nor a model in the Hugging Face "
                    f"cache ({_hub_cache()}); seme does not download: fetch it first, e.g. `{_download(ref)}`")


def _download(ref: str) -> str:
    """The command that fetches hub model `org/name` or `org/name@revision` into the cache."""
    repo, _, revision = ref.partition("@")
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def _hub_cache() -> str:
    """The Hugging Face hub cache folder, located as huggingface_hub locates it (`~` and $VARS expanded)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def _hub_snapshot(ref: str, where: str) -> str | None:
    """The cached snapshot of hub model `org/name` or `org/name@revision` (a branch, tag or commit, its
    sha in full or a prefix of it), as mergekit recipes name models; None where the cache does not hold
    the model. No network."""
    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1 or repo.startswith(("/", ".", "~")):
        return None
    folder = os.path.join(_hub_cache(), "models--" + repo.replace("/", "--"))
    if not os.path.isdir(folder):
        return None
    revision = revision or "main"
    pointer = os.path.join(folder, "refs", revision)
    commit = revision
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            commit = f.read().strip()
    snapshots = os.path.join(folder, "snapshots")
    cached = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    if commit in cached:
        return os.path.join(snapshots, commit)
    found = [c for c in cached if re.fullmatch(r"[0-9a-f]{7,40}", revision) and c.startswith(revision)]
    if len(found) == 1:  # a short sha, as git and the Hub's pages show commits
        return os.path.join(snapshots, found[0])
    if found:
        raise SemeError(f"{where}: {ref}: the commit {revision} is ambiguous in the Hugging Face cache "
                        f"({', '.join(found)}): give more of its sha")
    if commit != revision:  # the ref is there, its files not: a download that stopped before any finished
        problem = f"no files of its revision {revision} (commit {commit}: an unfinished download?)"
    else:
        refs = os.path.join(folder, "refs")
        names = sorted(os.path.relpath(os.path.join(d, f), refs) for d, _, files in os.walk(refs) for f in files)
        problem = f"not its revision {revision} (it holds {', '.join(names + [c[:12] for c in cached]) or 'none'})"
    raise SemeError(f"{where}: model not found: the Hugging Face cache ({_hub_cache()}) holds {repo} but {problem}; "
                    f"seme does not download: fetch it first, e.g. `{_download(ref)}`")


def _check_setting(setting: Any, where: str) -> None:
    """Structure of a parameter setting: scalar, gradient list, {value, filter} or a list of those."""
    scalar = (bool, int, float, str)
    if isinstance(setting, scalar):
        return
    if isinstance(setting, dict):
        if "pattern" in setting and "filter" not in setting:  # mergekit's early examples (gradient-slerp.yml)
            raise SemeError(f"{where}: 'pattern' is the old name of 'filter': write filter: {setting['pattern']} "
                            f"(mergekit 0.1.5 ignores 'pattern': the entry then matches every tensor)")
        _check_keys(setting, CONDITION_KEYS, where)
        if "value" not in setting:
            raise SemeError(f"{where}: a conditional parameter needs a 'value'")
        value = setting["value"]
        if isinstance(value, dict) or isinstance(value, list) and not all(isinstance(e, scalar) for e in value):
            raise SemeError(f"{where}: a condition's value must be a number or a list of numbers (gradient), "
                            f"not further conditions, got {value!r}")  # as mergekit's schema has it
        _check_setting(value, where)
        flt = setting.get("filter")
        if flt is not None:
            if not isinstance(flt, str):
                raise SemeError(f"{where}: filter must be a string, got {flt!r}")
            if flt.startswith("re:"):
                try:
                    re.compile(flt[3:])
                except re.error as e:
                    raise SemeError(f"{where}: invalid regular expression in filter '{flt}': {e}") from None
        return
    if isinstance(setting, list):
        if not setting:
            raise SemeError(f"{where}: empty list")
        if all(isinstance(e, scalar) for e in setting):
            return
        if all(isinstance(e, dict) for e in setting):
            for i, e in enumerate(setting):
                _check_setting(e, f"{where}[{i}]")
            return
    raise SemeError(f"{where}: expected a number, a list of numbers (gradient) or {{value, filter}}, got {setting!r}")


def _parameters(d: Any, where: str, method) -> dict:
    import warnings

    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SemeError(f"{where} must be a mapping, got {type(d).__name__}")
    for name, setting in d.items():
        _check_setting(setting, f"{where}.{name}")
    # Another method's parameter (int8_mask or normalize copied into an arcee_fusion or slerp recipe, as
    # published recipes have them) is ignored by mergekit: left out here too, with a word. A name no
    # method takes is a typo, refused by _check_parameter_names.
    foreign = [name for name in d if name not in method.param_index and name in _parameter_names()]
    if foreign:
        warnings.warn(f"{where}: {method.name} takes no {', '.join(map(repr, foreign))}; mergekit ignores "
                      f"{'it' if len(foreign) == 1 else 'them'}, and so does seme")
    d = {name: setting for name, setting in d.items() if name not in foreign}
    readers = {p.name: _VALUE_READERS[p.kind] for p in method.params if p.kind in _VALUE_READERS}
    return {name: _values_read(setting, readers[name]) if name in readers else setting for name, setting in d.items()}


def _values_read(setting: Any, read) -> Any:
    """`setting` with `read` applied to each of its values (scalars, gradient anchors, conditional values)."""
    if isinstance(setting, dict):
        return {**setting, "value": _values_read(setting["value"], read)}
    if isinstance(setting, list):
        return [_values_read(e, read) for e in setting]
    return read(setting)


def _number_read(value: Any) -> Any:
    """A string that spells a number, as the number: mergekit reads it so, and YAML 1.1 loads 1e-3 (no dot)
    as a string, so such values are common in recipes."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# The words pydantic, and so mergekit, reads as booleans (YAML itself takes true, yes, on, ... unquoted).
_BOOL_WORDS = {**dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
               **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False)}


def _bool_read(value: Any) -> Any:
    """0 and 1 (int8_mask: 1) and the words for true and false, as the booleans mergekit reads them as."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _BOOL_WORDS.get(value.lower(), value)
    return value


_VALUE_READERS = {int: _number_read, float: _number_read, bool: _bool_read}


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    # mergekit also reads torch's spelling, torch.bfloat16
    name = _DTYPE_ALIASES.get(value, value.removeprefix("torch.")) if isinstance(value, str) else value
    if name not in DTYPES:
        raise SemeError(f"config: {key} must be one of {', '.join(DTYPES)}, got {value!r}")
    return name


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise SemeError(f"{where}: layer_range must be [start, end] integers, got {value!r}")
    start, end = value
    if not 0 <= start < end:
        raise SemeError(f"{where}: layer_range {list(value)} must satisfy 0 <= start < end")
    return start, end


def _validate(raw: Any, text: str, base_dir: str, path: str | None) -> Recipe:
    from seme.methods import registry

    if raw is None:
        raise SemeError("config is empty")
    _check_keys(raw, TOP_KEYS, "config")
    method_name = raw.get("merge_method")
    if method_name is None:
        raise SemeError("config: missing required key 'merge_method'")
    if method_name not in registry.names():
        raise SemeError(f"config: unknown merge_method '{method_name}'{suggest(method_name, registry.names())}"
                        f" (known: {', '.join(registry.names())})")
    method = registry.get(method_name)
    if sum(raw.get(key) is not None for key in ("models", "slices", "modules")) != 1:  # null: absent, as in mergekit
        raise SemeError("config: give exactly one of 'models', 'slices' or 'modules'")

    base_model = _resolve_model(raw["base_model"], "base_model", base_dir) if raw.get("base_model") is not None else None
    global_params = _parameters(raw.get("parameters"), "parameters", method)

    labelled = []  # (where, slice)
    if raw.get("modules") is not None:
        modules = raw["modules"]
        if not isinstance(modules, dict) or not modules:
            raise SemeError("config: 'modules' must be a non-empty mapping of module name to its models or slices")
        for name, module in modules.items():
            where = f"modules.{name}"
            _check_keys(module, MODULE_KEYS, where)
            if (module.get("models") is None) == (module.get("slices") is None):
                raise SemeError(f"{where}: give exactly one of 'models' or 'slices'")
            params = _parameters(module.get("parameters"), f"{where}.parameters", method)
            labelled += _inputs(module, f"{where}.", base_model, base_dir, method, str(name), params)
    else:
        labelled = _inputs(raw, "", base_model, base_dir, method)

    for where, sl in labelled:
        base = sl.base_model or base_model
        models_in = [s.model for s in sl.sources]
        if len(set(models_in)) != len(models_in):
            raise SemeError(f"{where}: a model is listed twice")
        has_base = base is not None and base in models_in
        if base is not None and not has_base and method.base != "ignored":
            raise SemeError(f"{where}: base_model is not among the slice's sources")
        problem = method.check_inputs(len(models_in), has_base)
        if problem:
            raise SemeError(f"config: {where}: {problem}" if sl.module else f"config: {problem}")
        _check_parameter_names(method, sl, global_params, base)
    slices = [sl for _, sl in labelled]

    seed = raw.get("random_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SemeError(f"config: random_seed must be a non-negative integer, got {seed!r}")

    tok, pad, token_sources = raw.get("tokenizer_source"), None, {}
    if "tokenizer" in raw:
        if tok is not None:
            raise SemeError("config: give tokenizer_source or tokenizer, not both")
        spec = raw["tokenizer"]
        _check_keys(spec, TOKENIZER_KEYS, "config: tokenizer")
        tok, pad = spec.get("source", "union"), spec.get("pad_to_multiple_of")
        if tok is None:  # not "no re-mapping": the key's default is union, and mergekit refuses null
            raise SemeError("config: tokenizer: source must be base, union or a model, got null")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise SemeError(f"config: tokenizer: pad_to_multiple_of must be a positive integer, got {pad!r}")
        token_sources = _token_sources(spec.get("tokens") or {}, base_dir)
    if tok is not None and tok not in ("base", "union"):
        tok = _resolve_model(tok, "tokenizer_source", base_dir)

    template = raw.get("chat_template")
    if template is not None:
        from seme import chat_template

        template = chat_template.check(template)
    return Recipe(method_name, tuple(slices), base_model, global_params, _dtype(raw.get("dtype"), "dtype"),
                  _dtype(raw.get("out_dtype"), "out_dtype"), tok, seed, raw.get("slices") is not None, text, path,
                  template, pad,
                  token_sources, tuple(str(name) for name in raw.get("modules") or ()))


def _source(entry: Any, where: str, base_dir: str, method, layered: bool) -> Source:
    """One model of a `models:` list, or with `layered` one source of a slice (it has a layer_range)."""
    _check_keys(entry, SOURCE_KEYS if layered else MODEL_KEYS, where)
    if "model" not in entry or (layered and "layer_range" not in entry):
        raise SemeError(f"{where}: needs 'model' and 'layer_range'" if layered else f"{where}: missing 'model'")
    return Source(_resolve_model(entry["model"], where, base_dir),
                  _layer_range(entry["layer_range"], where) if layered else None,
                  _parameters(entry.get("parameters"), f"{where}.parameters", method))


def _inputs(raw: dict, prefix: str, base_model: str | None, base_dir: str, method, module: str | None = None,
            module_params: dict | None = None) -> list[tuple[str, Slice]]:
    """The output slices of a `models:` or `slices:` list (of the recipe, or of one module), each with
    the key path its errors name."""
    module_params = module_params or {}
    if raw.get("models") is not None:
        models = raw["models"]
        if not isinstance(models, list) or not models:
            raise SemeError(f"config: '{prefix}models' must be a non-empty list")
        sources = [_source({"model": entry} if isinstance(entry, str) else entry,  # a bare path: shorthand
                           f"{prefix}models[{i}]", base_dir, method, layered=False) for i, entry in enumerate(models)]
        if base_model and base_model not in {s.model for s in sources}:
            sources.append(Source(base_model))  # mergekit adds the base as an input, as here
        return [(f"{prefix}models", Slice(tuple(sources), module=module, module_parameters=module_params))]
    raw_slices = raw["slices"]
    if not isinstance(raw_slices, list) or not raw_slices:
        raise SemeError(f"config: '{prefix}slices' must be a non-empty list")
    slices = []
    for i, raw_slice in enumerate(raw_slices):
        where = f"{prefix}slices[{i}]"
        _check_keys(raw_slice, SLICE_KEYS, where)
        if raw_slice.get("residual_weight") is not None:  # as in mergekit, whose recipes may carry it
            import warnings

            warnings.warn(f"{where}: residual_weight has no effect (mergekit 0.1.5 reads it and ignores it too)")
        raw_sources = raw_slice.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise SemeError(f"{where}: 'sources' must be a non-empty list")
        sources = [_source(src, f"{where}.sources[{j}]", base_dir, method, layered=True)
                   for j, src in enumerate(raw_sources)]
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise SemeError(f"{where}: all sources of a slice must span the same number of layers, "
                            f"got {sorted(lengths)}")
        slice_base = raw_slice.get("base_model")
        slice_base = _resolve_model(slice_base, f"{where}.base_model", base_dir) if slice_base else None
        slices.append((where, Slice(tuple(sources), slice_base, _parameters(raw_slice.get("parameters"),
                                                                            f"{where}.parameters", method),
                                    module, module_params)))
    return slices


def join_reference(model: str, adapter: str | None = None) -> str:
    """A resolved reference: the model folder, or model+adapter as mergekit writes LoRA references."""
    return model if adapter is None else f"{model}+{adapter}"


def split_reference(ref: str) -> tuple[str, ...]:
    """(model folder,) or (model folder, adapter folder) of a resolved reference; folders that hold a
    '+' stay whole."""
    if os.path.isdir(ref):
        return (ref,)
    for i, c in enumerate(ref):
        if c == "+" and os.path.isdir(ref[:i]) and os.path.isdir(ref[i + 1:]):
            return ref[:i], ref[i + 1:]
    return (ref,)


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    """`recipe` with another random_seed, its text (which the model card holds) rewritten to match."""
    import yaml

    line = re.compile(r"^random_seed:.*$", re.MULTILINE)
    if line.search(recipe.text):
        text = line.sub(f"random_seed: {seed}", recipe.text)
    elif isinstance(yaml.safe_load(recipe.text), dict) and not recipe.text.lstrip().startswith("{"):
        text = recipe.text.rstrip("\n") + f"\nrandom_seed: {seed}\n"
    else:  # a recipe in flow style: written again
        text = yaml.safe_dump({**yaml.safe_load(recipe.text), "random_seed": seed}, sort_keys=False)
    return dataclasses.replace(recipe, random_seed=seed, text=text)


def _token_sources(tokens, base_dir: str) -> dict:
    """tokenizer.tokens, as mergekit writes it, validated (see Recipe.token_sources)."""
    if not isinstance(tokens, dict):
        raise SemeError(f"config: tokenizer: tokens must be a mapping of token to settings, got {type(tokens).__name__}")
    out = {}
    for token, setting in tokens.items():
        where = f"config: tokenizer: tokens: {str(token)!r}"
        _check_keys(setting, {"source", "force"}, where)
        force = setting.get("force", False)
        if not isinstance(force, bool):
            raise SemeError(f"{where}: force must be true or false, got {force!r}")
        source = setting.get("source")
        if isinstance(source, dict):
            kind = source.get("kind")
            if kind == "zero":
                _check_keys(source, {"kind"}, f"{where}: source")
                out[str(token)] = (("zero",), force)
                continue
            if kind != "model_token":
                raise SemeError(f"{where}: source kind must be 'zero' or 'model_token', got {kind!r}")
            _check_keys(source, {"kind", "model", "token_id", "token"}, f"{where}: source")
            if ("token_id" in source) == ("token" in source):
                raise SemeError(f"{where}: source: give token_id or token, one of them")
            ref = source.get("token_id", source.get("token"))
            if "token_id" in source and (not isinstance(ref, int) or isinstance(ref, bool) or ref < 0):
                raise SemeError(f"{where}: source: token_id must be a non-negative integer, got {ref!r}")
            if "token" in source and not isinstance(ref, str):  # an int would be taken for a token_id
                raise SemeError(f"{where}: source: token must be a string, got {ref!r}")
            out[str(token)] = (("model_token", _resolve_model(source.get("model"), f"{where}: source", base_dir), ref), force)
        elif isinstance(source, str):
            out[str(token)] = (("model", _resolve_model(source, f"{where}: source", base_dir)), force)
        else:
            raise SemeError(f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, ...}}")
    return out


def _check_parameter_names(method, sl: Slice, global_params: dict, base: str | None) -> None:
    import warnings

    scopes = [("parameters", global_params), (f"modules.{sl.module}.parameters", sl.module_parameters),
              ("slice parameters", sl.parameters)]
    scopes += [(f"parameters of {os.path.basename(s.model)}", s.parameters) for s in sl.sources]
    for where, params in scopes:
        for name, setting in params.items():
            if name not in method.param_index:
                raise SemeError(f"config: {where}: unknown parameter '{name}' for method '{method.name}'"
                                f"{suggest(name, method.param_index) or ' (it takes: ' + ', '.join(method.param_index) + ')'}")
            for value in _leaves(setting):
                method.param_index[name].coerce(value, f"config: {where}")
    for s in sl.sources:
        for name in s.parameters:
            if method.param_index[name].scope == "shared":
                warnings.warn(f"parameter '{name}' of {os.path.basename(s.model)} is shared by all models; "
                              f"mergekit ignores it there, and so does seme: set it in 'parameters'")
    # Required per-model parameters must be reachable for each model that needs them.
    for param in method.params:
        if not param.required:
            continue
        global_hit = any(param.name in scope for scope in (global_params, sl.module_parameters, sl.parameters))
        if param.scope == "shared":
            if not global_hit:
                raise SemeError(f"config: method '{method.name}' needs parameter '{param.name}'")
            continue
        for s in sl.sources:
            if param.scope == "non_base" and s.model == base:
                continue
            if not global_hit and param.name not in s.parameters:
                raise SemeError(f"config: model {os.path.basename(s.model)} needs parameter '{param.name}' "
                                f"for method '{method.name}'")


def _leaves(setting: Any):
    """Every scalar value a setting can take (gradient anchors, conditional values)."""
    if isinstance(setting, dict):
        yield from _leaves(setting["value"])
    elif isinstance(setting, list):
        for e in setting:
            yield from _leaves(e)
    else:
        yield setting


def matches(filter_: str | None, name: str) -> bool:
    """mergekit's substring filter; 're:' prefixes a regular expression, 'glob:' a shell pattern."""
    if filter_ is None or filter_ == "*":
        return True
    if filter_.startswith("re:"):
        return re.search(filter_[3:], name) is not None
    if filter_.startswith("glob:"):
        return fnmatch.fnmatchcase(name, filter_[5:])
    return filter_ in name


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The value of a parameter setting for tensor `name` at layer position t in [0, 1].

    Gradients interpolate linearly between evenly spaced anchors (numbers) or pick the anchor
    below t (booleans and strings); the first condition whose filter matches wins; None if none do.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            if matches(cond.get("filter"), name):
                return evaluate(cond["value"], name, t)
        return None
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
