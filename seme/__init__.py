"""seme: fast, data-free weight-space merging of language models.

    seme.merge("recipe.yml", "./merged")            # a whole checkpoint, streamed
    seme.merge_tensors("ties", [a, b], base=w0, weight=1.0, density=0.3)

Nothing heavy is imported here: torch loads on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["merge", "merge_tensors", "__version__"]


def merge(config, out_dir: str, **options) -> dict:
    """Merge the models of `config` (a YAML path, YAML text or dict) into `out_dir` (see `seme.api.merge`)."""
    from seme.api import merge as _merge

    return _merge(config, out_dir, **options)


def merge_tensors(method, tensors, base=None, **params):
    """Merge in-memory tensors with a registered method (see `seme.api.merge_tensors`)."""
    from seme.api import merge_tensors as _merge_tensors

    return _merge_tensors(method, tensors, base=base, **params)
