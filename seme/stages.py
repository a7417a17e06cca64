"""Multi-stage recipes, as mergekit-multimerge takes them: YAML documents separated by `---`, each a
recipe. A stage with a `name` is merged into the intermediate folder under that name, and other
stages may name it as a model. The stage without a name (or, where every stage has one, the stage
no other uses) is the final merge, written to OUT. Every stage is validated before the first one
runs; each is planned (its models' headers read) when the stages it uses are merged.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from seme import config
from seme.config import Recipe
from seme.errors import SemeError


@dataclass(frozen=True)
class Stage:
    name: str | None
    recipe: Recipe
    out_dir: str
    needs: frozenset[str]  # the names of the stages whose outputs it reads
    final: bool


def plan(docs: list, base_dir: str, path: str | None, out_dir: str, intermediate_dir: str | None) -> list[Stage]:
    """The stages of a recipe's documents (`config.documents`), in an order that merges each one's
    inputs before it."""
    names = []
    for i, (raw, _) in enumerate(docs):
        if not isinstance(raw, dict):
            raise SemeError(f"config: recipe {i + 1} of {len(docs)} must be a mapping, got {type(raw).__name__}")
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or name in ("", ".", "..") or os.sep in name or "\0" in name):
            raise SemeError(f"config: recipe {i + 1}: name must be a folder name, got {name!r}")
        if name is not None and name in names:
            raise SemeError(f"config: two recipes are named '{name}'")
        names.append(name)
    if names.count(None) > 1:
        raise SemeError(f"config: {names.count(None)} recipes have no name; in a multi-stage recipe only the final "
                        f"one may go without")
    out_dir = os.path.abspath(out_dir)
    folder = os.path.abspath(intermediate_dir or out_dir.rstrip(os.sep) + ".stages")
    outputs = {name: os.path.join(folder, name) for name in names if name is not None}
    found = []
    for i, ((raw, text), name) in enumerate(zip(docs, names)):
        label = name or f"recipe {i + 1}"
        others = {n: p for n, p in outputs.items() if n != name}
        try:
            recipe = config.validate(raw, text, base_dir, path, others)
        except SemeError as e:
            raise SemeError(f"stage {label}: {e}") from None
        used = set(recipe.models)
        if recipe.tokenizer_source not in (None, "base", "union"):
            used.add(recipe.tokenizer_source)
        used |= {source[1] for source, _ in recipe.token_sources.values() if len(source) > 1}
        needs = frozenset(n for n, p in others.items() if any(u == p or u.startswith(p + "+") for u in used))
        found.append((name, recipe, needs))
    used_by_others = set().union(*(needs for _, _, needs in found))
    finals = [name for name, _, _ in found if name is None] or [n for n in names if n not in used_by_others]
    if len(finals) != 1:
        raise SemeError(f"config: the stages {', '.join(finals)} are used by no other stage; a multi-stage recipe "
                        f"has one final merge: leave out its name")
    stages = [Stage(name, recipe, out_dir if name == finals[0] else outputs[name], needs, name == finals[0])
              for name, recipe, needs in found]
    return _in_order(stages)


def _in_order(stages: list[Stage]) -> list[Stage]:
    """Each stage after those it needs, otherwise in the file's order."""
    done, ordered, pending = set(), [], list(stages)
    while pending:
        ready = next((s for s in pending if s.needs <= done), None)
        if ready is None:
            raise SemeError(f"config: the stages {', '.join(s.name for s in pending if s.name)} use each other's "
                            f"outputs in a cycle")
        pending.remove(ready)
        ordered.append(ready)
        done.add(ready.name)
    return ordered


def run(stages: list[Stage], merge_one, *, lazy: bool, overwrite: bool, dry_run: bool, resume: bool) -> dict:
    """Merge the stages in order with `merge_one(recipe, out_dir, overwrite) -> stats`; returns the
    final stage's statistics. With `lazy`, a named stage whose folder holds seme's merge of the
    same recipe (its model card says so), from inputs not merged again in this run, is kept."""
    from seme.distributed import reports
    from seme.executor import not_empty
    from seme.io.card import merged_by_seme

    final = next(s for s in stages if s.final)
    if not (dry_run or overwrite or resume) and os.path.isdir(final.out_dir) and os.listdir(final.out_dir):
        raise not_empty(final.out_dir)  # before the first stage runs
    merged: set[str] = set()
    stats: dict = {}
    for stage in stages:
        label = f"seme: stage {stage.name or 'final'}"
        if dry_run:
            missing = [n for n in stage.needs if not _complete(stages, n)]
            if missing:
                if reports():
                    print(f"{label}: planned once {', '.join(sorted(missing))} is merged", file=sys.stdout)
                continue
            if reports():
                print(f"{label}:", file=sys.stdout)
            stats = merge_one(stage.recipe, stage.out_dir, overwrite)
            continue
        if not stage.final and lazy and not (stage.needs & merged) and merged_by_seme(stage.out_dir, stage.recipe.text):
            if reports():
                print(f"{label}: kept {stage.out_dir}, merged from this recipe before", file=sys.stderr)
            continue
        if reports():
            print(f"{label} -> {stage.out_dir}", file=sys.stderr)
        # an intermediate folder seme merged before is replaced: it is this recipe's working space
        stats = merge_one(stage.recipe, stage.out_dir, overwrite or (not stage.final and merged_by_seme(stage.out_dir)))
        merged.add(stage.name)
    return stats


def _complete(stages: list[Stage], name: str) -> bool:
    stage = next(s for s in stages if s.name == name)
    return os.path.isfile(os.path.join(stage.out_dir, "config.json"))

