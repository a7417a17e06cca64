"""One registry of merge methods: their parameters, input contracts and reference implementations.

A method is declared once, as data (`Method`), so that the config validator, the planner, the
`--dry-run` printer and the kernels all read the same parameter list and the same defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from seme.errors import SemeError

REQUIRED = object()

# Where a parameter binds: once per tensor, once per input model, or once per non-base input.
SHARED, INPUT, NON_BASE = "shared", "input", "non_base"


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, int, bool or str
    scope: str = SHARED
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()  # the allowed values of a str parameter

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """Validate one scalar value of this parameter; `where` says where it came from."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SemeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if value not in self.choices:
                raise SemeError(f"{where}: parameter '{self.name}' must be one of {', '.join(self.choices)}, "
                                f"got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SemeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf: no method gives them a meaning
            raise SemeError(f"{where}: parameter '{self.name}' must be a finite number, got {value}")
        if self.kind is int and float(value) != int(value):
            raise SemeError(f"{where}: parameter '{self.name}' must be an integer, got {value!r}")
        value = self.kind(value)
        if self.minimum is not None and value < self.minimum:
            raise SemeError(f"{where}: parameter '{self.name}' must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise SemeError(f"{where}: parameter '{self.name}' must be <= {self.maximum}, got {value}")
        return value


@dataclass(frozen=True)
class Method:
    """A merge method. `fn(inputs, params)` merges one tensor (see `Inputs`); it returns the tensor,
    or (tensor, statistics) for methods that report per-tensor figures."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...] = ()
    base: str = "ignored"  # "required" | "optional" | "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    reference: str = ""
    # bound params -> why their values, well-typed each, cannot be merged (a division by zero), or None
    check: Callable[[dict], str | None] | None = None
    # (a, b): the reference merge of tensors of n elements holds at most a + b * (inputs) fp32 tensors of
    # n elements at once, its result included (tests/test_memory.py measures it); --max-memory counts it
    peak_buffers: tuple[float, float] = (2.0, 4.0)
    param_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})

    def working_bytes(self, n_inputs: int, numel: int, element_size: int = 4) -> int:
        """What the reference merge of `n_inputs` tensors of `numel` elements holds at its peak."""
        a, b = self.peak_buffers
        return int((a + b * n_inputs) * numel * element_size)

    def check_inputs(self, n_inputs: int, has_base: bool) -> str | None:
        """The reason why this many inputs cannot be merged, or None."""
        if self.base == "required" and not has_base:
            return f"method '{self.name}' needs a base_model"
        n_non_base = n_inputs - int(has_base and self.base != "ignored")
        if n_inputs < self.min_inputs:
            return f"method '{self.name}' needs at least {self.min_inputs} input models, got {n_inputs}"
        if self.max_inputs is not None and n_inputs > self.max_inputs:
            return f"method '{self.name}' takes at most {self.max_inputs} input models, got {n_inputs}"
        if n_non_base < self.min_non_base:
            return f"method '{self.name}' needs at least {self.min_non_base} models besides the base, got {n_non_base}"
        if self.max_non_base is not None and n_non_base > self.max_non_base:
            return f"method '{self.name}' takes at most {self.max_non_base} models besides the base, got {n_non_base}"
        return None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def _load() -> dict[str, Method]:
    # The family modules register their methods on import: done on first use. They import torch
    # inside their functions, so that planning and the native engine never load it.
    # Importing all of them each time is a no-op after the first, even if one was imported directly.
    from seme.methods import (arcee_fusion, linear, model_stock, nearswap, passthrough, ram, seme,  # noqa: F401
                              slerp, task_vector)

    return _METHODS


def get(name: str) -> Method:
    return _load()[name]


def names() -> list[str]:
    return list(_load())


def bind(method: Method, supplied: dict, n_inputs: int, base_index: int | None, where: str) -> dict:
    """Resolve `supplied` (scalars broadcast, lists per input) into the values `method.fn` takes.

    Per-input parameters become lists aligned with all inputs (INPUT) or the non-base ones (NON_BASE).
    """
    unknown = sorted(set(supplied) - set(method.param_index))
    if unknown:
        raise SemeError(f"{where}: unknown parameter '{unknown[0]}' for method '{method.name}'"
                        f"{suggest(unknown[0], method.param_index)}")
    has_base = base_index is not None and method.base != "ignored"
    n_non_base = n_inputs - int(has_base)
    bound = {}
    for param in method.params:
        value = supplied.get(param.name, param.default)
        count = {SHARED: None, INPUT: n_inputs, NON_BASE: n_non_base}[param.scope]
        if value is REQUIRED:
            if count == 0:
                bound[param.name] = []
                continue
            raise SemeError(f"{where}: method '{method.name}' needs parameter '{param.name}'")
        if count is None:
            bound[param.name] = value if value is None else param.coerce(value, where)
            continue
        values = value if isinstance(value, (list, tuple)) else [value] * count
        if len(values) != count:
            raise SemeError(f"{where}: parameter '{param.name}' needs {count} values (one per input), got {len(values)}")
        bound[param.name] = [v if v is None else param.coerce(v, where) for v in values]
    problem = method.check(bound) if method.check else None
    if problem:
        raise SemeError(f"{where}: {problem}")
    return bound


def suggest(word, choices) -> str:
    """A ' (did you mean ...?)' hint, or ''. `word` may be any YAML key (a number, null), not only a string."""
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
