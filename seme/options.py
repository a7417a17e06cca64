"""Merge options, defined once: the CLI flags and the keyword arguments of `seme.merge` come from here."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from seme.errors import SemeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:(bytes?)|([kmgt]i?)?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like '2GB', '500MB', '1.5GiB', '4096 bytes', or mergekit's '5B' (5 * 10^9)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value))
    nbytes = 0
    if m and m.group(2):
        nbytes = round(float(m.group(1)))
    elif m:
        unit = (m.group(3) or "").lower()
        if not unit and str(value).strip()[-1] in "bB":  # mergekit's K/M/B suffixes: B is a billion, not a byte
            unit = "g"
        nbytes = round(float(m.group(1)) * _UNITS[unit])  # 4.27 GB is 4270000000 bytes, not 4269999999.9999995
    if nbytes < 1:  # 0, or a fraction of a byte (0.5): no shard or budget holds anything
        raise SemeError(f"invalid size {value!r} (expected e.g. 2GB, 500MB, 1.5GiB or a byte count)")
    return nbytes


def format_size(nbytes: float, up: bool = False) -> str:
    """Bytes in the unit that suits them, as parse_size reads them back: '1.50 GB', '12.3 MB', '512 bytes'
    (not '512 B', which mergekit's size syntax, and so parse_size, reads as 512 billion). With `up`,
    rounded up: a need the user may give back as an option, which must then be enough."""
    for unit, scale, digits in (("TB", 10**12, 2), ("GB", 10**9, 2), ("MB", 10**6, 1), ("kB", 10**3, 1)):
        if nbytes >= scale:
            if up:
                return f"{-(-math.ceil(nbytes) * 10**digits // scale) / 10**digits:.{digits}f} {unit}"
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{math.ceil(nbytes) if up else int(nbytes)} bytes"


def parse_folder(value: Any) -> str:
    """A folder, ~ the home folder also where no shell expanded it (quoted, or --flag=~/x)."""
    return os.path.expanduser(str(value))


def parse_device(value: Any) -> str:
    # torch keeps a device's index in 8 bits (c10::DeviceIndex): cuda:255 would be taken for cuda, and larger
    # indices do not parse
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value) or int(value[5:] or 0) > 127:
        raise SemeError(f"invalid device {value!r} (expected cpu, cuda or cuda:N, N up to 127)")
    return value


def parse_backend(value: Any) -> str:
    if value not in ("auto", "fused", "reference"):
        raise SemeError(f"invalid backend {value!r} (expected auto, fused or reference)")
    return value


def parse_seed(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SemeError(f"invalid random seed {value!r} (expected a non-negative integer)")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # python keyword; the CLI flag is --name-with-dashes
    default: Any
    help: str
    parse: Any = None  # value converter for non-flag options; None for boolean flags
    short: str | None = None  # a one-letter flag beside --name, as mergekit spells it


OPTIONS = (
    Option("device", "cpu", "where the math runs: cpu, cuda or cuda:N", parse_device),
    Option("backend", "auto", "merge kernels: auto (fused where available), fused (an error for a method no kernel "
           "covers; tensors no kernel takes, fp64, of 2^32 elements or more, or filter-wise Model Stock's, still merge "
           "in plain torch) or reference "
           "(plain torch)", parse_backend),
    Option("out_shard_size", "5GB", "maximum size of one output shard, e.g. 2GB, 500MB (or mergekit's 500M, 5B)",
           parse_size),
    Option("max_memory", None, "bound on the bytes held at once: read-ahead, the merge (its temporaries too) and "
           "pending writes, and SeMe's alignment pre-pass (default: 4GB, or what the merge needs if more)", parse_size),
    Option("dry_run", False, "print the plan (tensors, bytes, method and parameters per tensor) and exit"),
    Option("overwrite", False, "replace a non-empty output folder (or an interrupted merge's staging folder)"),
    Option("resume", False, "continue an interrupted merge from its finished shards"),
    Option("buffered_writes", False, "write the output through the page cache (default: direct I/O where the "
           "filesystem takes it)"),
    Option("allow_nonfinite", False, "merge inputs that contain NaN or Inf (as the reference backend and mergekit "
           "do, whatever the backend) and write merged tensors that contain them, instead of stopping"),
    Option("progress", None, "show a progress bar (default: when stderr is a terminal)"),
    Option("random_seed", None, "seed of the randomised methods (DARE, DELLA) in place of the recipe's random_seed",
           parse_seed),
    Option("copy_tokenizer", True, "write the tokenizer files of the base (or first) model into the output; a "
           "tokenizer the recipe chooses (tokenizer_source, tokenizer) is written either way"),
    Option("write_model_card", True, "write a README.md model card that holds the recipe"),
    Option("intermediate_dir", None, "where the named stages of a multi-stage recipe are merged (default: "
           "OUT.stages)", parse_folder, short="-I"),
    Option("lazy", True, "keep a named stage's folder that seme merged from the same recipe before"),
)


@dataclass(frozen=True)
class MergekitFlag:
    """A flag of mergekit-yaml with no option of its own here, accepted so that switching tools is a
    change of command. An on/off flag comes as --name and --no-name."""

    name: str  # the flag without its dashes, as a python name
    effect: str  # what it does here, for --help
    takes: type | None = None  # its value's type; None: an on/off flag
    sets: dict = field(default_factory=dict)  # options it sets when on (unless given themselves)
    env: str | None = None  # environment variable its value goes to
    minimum: int | None = None  # the least value it takes
    refused: tuple[bool, str] | None = None  # (the state seme refuses, why)
    short: str | None = None


MERGEKIT_FLAGS = (
    MergekitFlag("cuda", "same as --device cuda", sets={"device": "cuda"}),
    MergekitFlag("gpu_rich", "same as --device cuda", sets={"device": "cuda"}),
    MergekitFlag("quiet", "same as --no-progress", sets={"progress": False}),
    MergekitFlag("transformers_cache", "the Hugging Face hub cache that model names are looked up in", str,
                 env="HF_HUB_CACHE"),
    MergekitFlag("num_threads", "threads of the CPU kernels (OMP_NUM_THREADS)", int, env="OMP_NUM_THREADS", minimum=1,
                 short="-j"),
    MergekitFlag("safe_serialization", "always on: seme writes safetensors",
                 refused=(False, "seme writes safetensors only; pickled checkpoints can run code when loaded")),
    MergekitFlag("unsafe_truncate_embeddings", "refused: give the models one vocabulary with tokenizer_source",
                 refused=(True, "--unsafe-truncate-embeddings is not supported: give the models one vocabulary "
                                "with tokenizer_source (rows are re-mapped by token, not truncated)")),
    MergekitFlag("allow_crimes", "no effect: models of different architectures merge wherever their tensors' "
                 "names and shapes agree"),
    MergekitFlag("trust_remote_code", "no effect: seme never runs a model's code"),
    MergekitFlag("lazy_unpickle", "no effect: every input is memory-mapped, PyTorch .bin files too (their pickle is "
                                   "read without running it)"),
    MergekitFlag("low_cpu_memory", "no effect: resident memory stays at about one tensor (see --max-memory)"),
    MergekitFlag("read_to_gpu", "no effect: inputs are staged to the GPU ahead of their merge"),
    MergekitFlag("multi_gpu", "no effect: split a merge across GPUs with torchrun"),
    MergekitFlag("async_write", "no effect: outputs are always written while the next tensors merge"),
    MergekitFlag("write_threads", "no effect: one background thread writes", int),
    MergekitFlag("clone_tensors", "no effect: every output tensor is its own buffer"),
    MergekitFlag("lora_merge_cache", "no effect: adapters are applied as the tensors are read; nothing is cached", str),
    MergekitFlag("lora_merge_dtype", "no effect: adapters are applied as peft's merge_and_unload applies them", str),
)


def resolve(**given) -> dict:
    """Options with defaults filled in and values parsed; unknown names are errors."""
    from seme.methods.registry import suggest

    known = {o.name: o for o in OPTIONS}
    for name in given:
        if name not in known:
            raise SemeError(f"unknown option '{name}'{suggest(name, known)}")
    out = {}
    for o in OPTIONS:
        value = given.get(o.name, o.default)
        out[o.name] = o.parse(value) if o.parse and value is not None else value
    return out
