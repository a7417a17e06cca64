"""The Python API: `merge` (a whole checkpoint) and `merge_tensors` (tensors you hold)."""
from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Sequence

from seme.errors import SemeError
from seme.methods import registry
from seme.methods.inputs import Inputs

if TYPE_CHECKING:  # torch is imported where a merge needs it: CPU merges of the fused methods never do
    import torch


def merge_tensors(method: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
                  name: str = "tensor", seed: int = 0, out_dtype: torch.dtype | None = None,
                  **params) -> torch.Tensor:
    """Merge `tensors` (and `base`, if the method uses one) with a registered method.

    Per-input parameters take a scalar (broadcast) or a list with one value per tensor in
    `tensors` (INPUT-scoped parameters of methods that use a base also count the base, first).
    `name` and `seed` key the random draws of DARE / DELLA.
    """
    try:
        spec = registry.get(method)
    except KeyError:
        raise SemeError(f"unknown merge method '{method}'{registry.suggest(method, registry.names())}") from None
    if method == "seme":  # its alignment reads the models' heads and norms, which tensors alone do not carry
        raise SemeError("merge_tensors: method 'seme' aligns whole models (seme.merge); on tensors already "
                        "aligned, its Select / Compute / Erase step is method 'sce'")
    all_tensors = ([base] if base is not None else []) + list(tensors)
    base_index = 0 if base is not None else None
    problem = spec.check_inputs(len(all_tensors), base_index is not None)
    if problem:
        raise SemeError(problem)
    shapes = {tuple(t.shape) for t in all_tensors}
    if len(shapes) != 1:
        raise SemeError(f"tensors of different shapes cannot be merged: {sorted(shapes)}")
    bound = registry.bind(spec, params, len(all_tensors), base_index, f"merge_tensors({method})")
    inputs = Inputs(tuple(all_tensors), base_index if spec.base != "ignored" else None, name, seed)
    result = spec.fn(inputs, bound)
    return result.to(out_dtype or all_tensors[0].dtype)


def merge(config, out_dir: str, **options) -> dict:
    """Merge the models of `config` (a YAML path, YAML text or dict) into `out_dir`.

    Options are those of the CLI (see `seme.options.OPTIONS`): device, backend, out_shard_size,
    max_memory, dry_run, overwrite, resume, buffered_writes, allow_nonfinite, progress, random_seed,
    copy_tokenizer, write_model_card, intermediate_dir, lazy. A multi-stage recipe (several YAML
    documents, `seme.stages`) is merged stage by stage. Returns statistics of the run (of its final
    stage; with dry_run, the plan's of the last stage it could plan: one that uses an unmerged stage cannot be).
    """
    from seme import config as recipe_config
    from seme.distributed import reports
    from seme.options import parse_folder, resolve

    opts = resolve(**options)
    out_dir = parse_folder(out_dir)  # ~/merged: the home folder's, as in recipes' model paths (not ./~/merged)
    shown = set()

    def show_once(message, *_):  # one line each; a warning about every input model is said once
        if reports() and str(message) not in shown:
            shown.add(str(message))
            print(f"seme: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_once
        docs, base_dir, path = recipe_config.documents(config)
        if len(docs) == 1:
            return _merge_recipe(_with_options(recipe_config.validate(*docs[0], base_dir, path), opts), out_dir, opts)
        import dataclasses

        from seme import stages

        found = [dataclasses.replace(stage, recipe=_with_options(stage.recipe, opts))  # all checked before a merge
                 for stage in stages.plan(docs, base_dir, path, out_dir, opts["intermediate_dir"])]
        return stages.run(found, lambda recipe, out, overwrite: _merge_recipe(recipe, out, {**opts, "overwrite": overwrite}),
                          lazy=opts["lazy"], overwrite=opts["overwrite"], dry_run=opts["dry_run"], resume=opts["resume"])


def _with_options(recipe, opts: dict):
    """`recipe` as the options change it (--random-seed), checked against them."""
    from seme import config as recipe_config

    if opts["random_seed"] is not None:
        recipe = recipe_config.with_seed(recipe, opts["random_seed"])
    if recipe.chat_template is not None and not opts["copy_tokenizer"] and recipe.tokenizer_source is None:
        raise SemeError("config: chat_template goes into the tokenizer files, which --no-copy-tokenizer leaves out")
    return recipe


def _merge_recipe(recipe, out_dir: str, opts: dict) -> dict:
    """One recipe (`_with_options`) into `out_dir`, with resolved options."""
    from seme import __version__, distributed
    from seme.plan import make_plan

    plan = make_plan(recipe)
    if opts["dry_run"]:
        from seme.executor import memory_backend
        from seme.report import print_plan

        if distributed.reports():
            print_plan(plan, sys.stdout, opts["device"], memory_backend(opts["backend"], opts["allow_nonfinite"]))
        distributed.settle()  # no merge brings the ranks together: one that could not plan is heard here
        return {"tensors": len(plan.tasks), "input_bytes": plan.input_bytes, "output_bytes": plan.output_bytes}
    if opts["device"].startswith("cuda"):
        count, index = _cuda_devices(), int(opts["device"].partition(":")[2] or 0)
        if index >= count:
            seen = (f"{count} CUDA device{'s' if count > 1 else ''}, cuda:0" + (f" to cuda:{count - 1}" if count > 1 else "")
                    if count else "no CUDA device")
            raise SemeError(f"--device {opts['device']} was asked for, but torch sees {seen}")
    from seme import executor

    progress = sys.stderr.isatty() if opts["progress"] is None else opts["progress"]
    stats = executor.run(plan, out_dir, device=opts["device"], backend=opts["backend"],
                         shard_size=opts["out_shard_size"],
                         overwrite=opts["overwrite"], resume=opts["resume"],
                         allow_nonfinite=opts["allow_nonfinite"], max_memory=opts["max_memory"],
                         direct_io=not opts["buffered_writes"], tokenizer=opts["copy_tokenizer"],
                         card=opts["write_model_card"], progress=progress, version=__version__)
    seconds = max(stats["seconds"], 1e-9)
    if distributed.reports():
        print(f"seme: merged {stats['tensors']} tensors with {recipe.merge_method} "
              f"({stats['input_bytes'] / 1e9:.3f} GB in, {stats['input_bytes'] / 1e9 / seconds:.2f} GB/s) "
              f"in {stats['seconds']:.2f} s -> {out_dir}", file=sys.stderr)
    return stats


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
