"""seme: fast, data-free weight-space merging of language models.

    seme.merge("recipe.yml", "./merged")            # a whole checkpoint, streamed
    seme.merge_tensors("ties", [a, b], base=w0, weight=1.0, density=0.3)

Nothing heavy is imported here: torch loads on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["merge", "merge_tensors", "__version__"]


def merge(config, out_dir: str, **options) -> dict:
    """Merge the models of `config` (a YAML path, YAML text or dict) into `out_dir`.

    Options are those of the CLI (see `seme.options.OPTIONS`): device, out_shard_size, dry_run,
    overwrite, progress. Returns statistics of the run (or the plan's, with dry_run).
    """
    import sys
    import warnings

    from seme import config as recipe_config
    from seme.options import resolve
    from seme.plan import make_plan

    opts = resolve(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        recipe = recipe_config.load(config)
        plan = make_plan(recipe)
    if opts["dry_run"]:
        from seme.report import print_plan

        print_plan(plan, sys.stdout)
        return {"tensors": len(plan.tasks), "input_bytes": plan.input_bytes, "output_bytes": plan.output_bytes}
    from seme import executor

    progress = sys.stderr.isatty() if opts["progress"] is None else opts["progress"]
    stats = executor.run(plan, out_dir, device=opts["device"], shard_size=opts["out_shard_size"],
                         overwrite=opts["overwrite"], progress=progress, version=__version__)
    seconds = max(stats["seconds"], 1e-9)
    print(f"seme: merged {stats['tensors']} tensors with {recipe.merge_method} "
          f"({stats['input_bytes'] / 1e9:.3f} GB in, {stats['input_bytes'] / 1e9 / seconds:.2f} GB/s) "
          f"in {stats['seconds']:.1f} s -> {out_dir}", file=sys.stderr)
    return stats


def merge_tensors(method, tensors, base=None, **params):
    """Merge in-memory tensors with a registered method (see `seme.api.merge_tensors`)."""
    from seme.api import merge_tensors as _merge_tensors

    return _merge_tensors(method, tensors, base=base, **params)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    import sys

    print(f"seme: warning: {message}", file=sys.stderr)
