"""Merge options, defined once: the CLI flags and the keyword arguments of `seme.merge` come from here."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from seme.errors import SemeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like '2GB', '500MB', '1.5GiB'."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise SemeError(f"invalid size {value!r} (expected e.g. 2GB, 500MB, 1.5GiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_device(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise SemeError(f"invalid device {value!r} (expected cpu, cuda or cuda:N)")
    return value


def parse_backend(value: Any) -> str:
    if value not in ("auto", "fused", "reference"):
        raise SemeError(f"invalid backend {value!r} (expected auto, fused or reference)")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # python keyword; the CLI flag is --name-with-dashes
    default: Any
    help: str
    parse: Any = None  # value converter for non-flag options; None for boolean flags


OPTIONS = (
    Option("device", "cpu", "where the math runs: cpu, cuda or cuda:N", parse_device),
    Option("backend", "auto", "merge kernels: auto (fused where available), fused (required) or reference "
           "(plain torch)", parse_backend),
    Option("out_shard_size", "5GB", "maximum size of one output shard, e.g. 2GB or 500MB", parse_size),
    Option("max_memory", "4GB", "bound on the bytes held at once (read-ahead, merge, pending writes)", parse_size),
    Option("dry_run", False, "print the plan (tensors, bytes, method and parameters per tensor) and exit"),
    Option("overwrite", False, "replace a non-empty output folder (or an interrupted merge's staging folder)"),
    Option("resume", False, "continue an interrupted merge from its finished shards"),
    Option("buffered_writes", False, "write the output through the page cache (default: direct I/O where the "
           "filesystem takes it)"),
    Option("allow_nonfinite", False, "write merged tensors that contain NaN or Inf instead of stopping"),
    Option("progress", None, "show a progress bar (default: when stderr is a terminal)"),
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
