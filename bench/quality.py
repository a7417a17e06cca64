"""`python -m bench.quality`: every merge method, with its usual parameter sweep, on the sets of the zoo.

Each (set, method, parameters) is merged with `seme.merge` into a temporary folder and evaluated on
the zoo's validation and test prompts: exact match per skill, normalised accuracy (merged ÷ the
expert, on that expert's skill), fact-table retention (merged ÷ base) and held-out perplexity. Per
method the parameters with the best validation score are chosen and their test scores reported.
Writes `docs/results.md` and a chart per set under `docs/results/`; a method that cannot merge a
set gets the engine's reason in the table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from bench import zoo

HOMOGENEOUS = {f"{n} experts": tuple(f"expert-{s}" for s in ("rev", "sort", "add", "cipher")[:n]) for n in (2, 3, 4)}
HETERO = {  # the rev expert and a sort expert that differs from the base's other fine-tunes
    "rotated": "residual stream rotated by a random orthogonal matrix (norms folded; the same function)",
    "deep": "deeper than the base: made from it by duplicating its middle layers, then fine-tuned",
    "vocab": "ids permuted; the reserved tokens and the 16 fact-key letters spelt differently",
    "head": "LM head re-initialised and retrained (body frozen) before fine-tuning",
    "foreign": "fine-tuned from a second base, pretrained with another seed",
}
SETS = {**HOMOGENEOUS, **{k: ("expert-rev", f"{k}-{zoo.HETERO_SKILL}") for k in HETERO}}

_SEME = ({"select_topk": 1.0}, {"select_topk": 0.3}, {"select_topk": 0.1},
         {"select_topk": 1.0, "alignment": "never"}, {"select_topk": 1.0, "align_tolerance": 0.2},
         {"select_topk": 1.0, "align_mode": "probability"},
         {"select_topk": 1.0, "align_mode": "probability", "temperature": 0.2})
SWEEPS = {  # method -> parameter sets, all weights 1 (`--quick` takes the first of each)
    "linear": ({},),
    "task_arithmetic": tuple({"lambda": x} for x in (1.0, 0.7, 0.5, 0.3)),
    "ties": tuple({"density": d, "lambda": x} for d in (0.5, 0.2) for x in (1.0, 1.5)),
    "dare_linear": tuple({"density": 0.5, "lambda": x} for x in (1.0, 0.5)),
    "dare_ties": tuple({"density": 0.5, "lambda": x} for x in (1.0, 0.5)),
    "breadcrumbs": tuple({"density": 0.9, "gamma": 0.01, "lambda": x} for x in (1.0, 0.5)),
    "breadcrumbs_ties": tuple({"density": 0.9, "gamma": 0.01, "lambda": x} for x in (1.0, 0.5)),
    "della": ({"density": 0.5, "epsilon": 0.1},),
    "della_linear": tuple({"density": 0.5, "epsilon": 0.1, "lambda": x} for x in (1.0, 0.5)),
    "sce": tuple({"select_topk": x} for x in (1.0, 0.3, 0.1)),
    "model_stock": ({},),
    "slerp": ({"t": 0.5},),
    "nuslerp": ({},),
    "passthrough": ({},),
    "seme": _SEME,
}
CHECK_METHODS = {  # what `bench.zoo build` merges to check its requirements
    "linear": ("linear", {}),
    "task_arithmetic λ=0.5": ("task_arithmetic", {"lambda": 0.5}),
    "task_arithmetic λ=1": ("task_arithmetic", {"lambda": 1.0}),
    "ties d=0.5": ("ties", {"density": 0.5, "lambda": 1.0}),
}


def recipe(root: str, members, method: str, params: dict) -> dict:
    """The mergekit-style recipe: the base is the pivot; slerp interpolates the two members themselves."""
    from seme.methods import registry

    declared = {p.name: p for p in registry.get(method).params}
    local = {k: v for k, v in params.items() if declared[k].scope != registry.SHARED}
    if "weight" in declared:
        local["weight"] = 1.0
    paths = [os.path.join(root, m) for m in members]
    out = {"merge_method": method, "dtype": "float32", "random_seed": 0,
           "parameters": {k: v for k, v in params.items() if k not in local},
           "models": [{"model": p, **({"parameters": local} if local else {})} for p in paths]}
    if method == "slerp":
        out["base_model"] = paths[0]
    elif method not in ("linear", "passthrough"):
        out["base_model"] = os.path.join(root, "base")
    return out


def merge_and_evaluate(root: str, cfg: zoo.Config, members, method: str, params: dict) -> dict:
    """{"val": scores, "test": scores} of the merged model (with SeMe's alignment report), or {"error": why}."""
    import seme
    from seme.errors import SemeError

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "merged")
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                seme.merge(recipe(root, members, method, params), out, progress=False, overwrite=True)
        except SemeError as e:
            return {"error": str(e).splitlines()[0]}
        result = zoo.evaluate_folder(out, cfg)
        if method == "seme":
            with open(os.path.join(out, "seme_report.json"), encoding="utf-8") as f:
                result["alignment"] = [{"applied": s["applied"], "distance": s.get("distance_from_identity")}
                                       for s in json.load(f)["sources"]]
    return result


def _job(root: str, cfg: zoo.Config, set_name: str, method: str, params: dict):
    import torch

    torch.set_num_threads(1)
    return set_name, method, params, merge_and_evaluate(root, cfg, SETS[set_name], method, params)


# --- scoring ---------------------------------------------------------------------------------------

def skills_of(manifest: dict, members) -> dict[str, str]:
    """skill -> the member that is its expert."""
    return {manifest["models"][m]["skill"]: m for m in members}


def summarise(manifest: dict, members, scores: dict, split: str) -> dict:
    experts = skills_of(manifest, members)
    s = scores[split]
    norm = {k: s[k] / manifest["models"][m]["scores"][split][k] for k, m in experts.items()}
    base_fact = manifest["models"]["base"]["scores"][split][zoo.FACT]
    return {"em": {k: s[k] for k in experts}, "normalised": sum(norm.values()) / len(norm),
            "per_skill": norm, "fact": s[zoo.FACT] / base_fact if s[zoo.FACT] is not None else None,
            "ppl": s["ppl"]}


def fmt_params(params: dict) -> str:
    return ", ".join(f"{'λ' if k == 'lambda' else k}={v}" for k, v in params.items()) or "—"


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def choose(manifest: dict, members, runs: dict) -> dict:
    """method -> (parameters, result, test summary or None when it cannot merge): the best on validation."""
    chosen = {}
    for method in SWEEPS:
        ok = [(p, r) for p, r in runs.get(method, []) if "error" not in r]
        if ok:
            p, r = max(ok, key=lambda pr: summarise(manifest, members, pr[1], "val")["normalised"])
            chosen[method] = (p, r, summarise(manifest, members, r, "test"))
        elif runs.get(method):
            chosen[method] = (*runs[method][0], None)
    return chosen


def standing(chosen: dict) -> tuple[list[str], int | None]:
    """Methods that merge the set, best first, and SeMe's rank (1 + how many score higher)."""
    merged = sorted((m for m in chosen if chosen[m][2]), key=lambda m: -chosen[m][2]["normalised"])
    if "seme" not in merged:
        return merged, None
    score = round(chosen["seme"][2]["normalised"], 2)
    return merged, 1 + sum(round(chosen[m][2]["normalised"], 2) > score for m in merged)


def verdict(chosen: dict) -> str:
    merged, rank = standing(chosen)
    if rank is None:
        return f"SeMe cannot merge this set: {chosen['seme'][1]['error']}"
    best = max((m for m in merged if m != "seme"), key=lambda m: chosen[m][2]["normalised"], default=None)
    seme, other = chosen["seme"][2]["normalised"], chosen[best][2]["normalised"] if best else None
    if best is None:
        return f"SeMe is the only method that merges this set ({seme:.2f})."
    if rank > 1:
        return (f"**SeMe does not win this set**: it ranks {rank} of {len(merged)} ({seme:.2f}); "
                f"{merged[0]} wins with {chosen[merged[0]][2]['normalised']:.2f}.")
    tie = round(other, 2) == round(seme, 2)
    worst = min(chosen["seme"][2]["per_skill"].values())
    return ((f"SeMe ties for first with {best} ({seme:.2f})." if tie else
             f"SeMe wins this set ({seme:.2f}; next: {best}, {other:.2f}).")
            + (f" But its worst skill is {worst:.2f}: it keeps one member's skill, not both." if worst < 0.1 else ""))


def alignment_note(members, result: dict) -> str:
    if "alignment" not in result:
        return ""
    return " (alignment: " + "; ".join(
        f"{m} {'applied' if a['applied'] else 'skipped'}"
        + (f", ‖Q−I‖/√d={a['distance']:.2f}" if a["distance"] is not None else "")
        for m, a in zip(members, result["alignment"])) + ")"


def section(manifest: dict, set_name: str, members, runs: dict, chosen: dict) -> str:
    skills = list(skills_of(manifest, members))
    head = ("| model | parameters (chosen on validation) | " + " | ".join(skills) + " | normalised acc. "
            "| worst skill | fact retention | ppl |\n|---|---|" + "---|" * (len(skills) + 4))
    rows = []
    for name in ("base", *members):
        s = manifest["models"][name]["scores"]["test"]
        rows.append(f"| *{name}* | — | " + " | ".join(_num(s[k]) for k in skills)
                    + f" | | | fact EM {_num(s[zoo.FACT])} | {_num(s['ppl'])} |")
    merged, _ = standing(chosen)
    for method in merged + [m for m in chosen if m not in merged]:
        p, r, t = chosen[method]
        if t is None:
            why = r["error"].replace("|", "/")
            rows.append(f"| {method} | cannot merge this set: {why} |" + " |" * (len(skills) + 4))
            continue
        name = "**seme**" if method == "seme" else method
        rows.append(f"| {name} | {fmt_params(p)}{alignment_note(members, r)} | "
                    + " | ".join(_num(t["em"][k]) for k in skills) + f" | {_num(t['normalised'])} | "
                    f"{_num(min(t['per_skill'].values()))} | {_num(t['fact'])} | {_num(t['ppl'])} |")
    sweep = []
    for method in SWEEPS:
        for p, r in runs.get(method, []):
            if "error" in r:
                sweep.append(f"| {method} | {fmt_params(p)} | cannot merge | | |")
                continue
            val, test = (summarise(manifest, members, r, split) for split in ("val", "test"))
            sweep.append(f"| {method} | {fmt_params(p)} | {val['normalised']:.2f} | {test['normalised']:.2f} "
                         f"| {_num(test['fact'])} |")
    desc = (f"The base and {', '.join(members)}" if set_name in HOMOGENEOUS else
            f"The base, expert-rev and {members[1]}: the sort expert, {HETERO[set_name]}")
    return (f"### {set_name}\n\n{desc}.\n\n{head}\n" + "\n".join(rows) + f"\n\n{verdict(chosen)}\n\n"
            f"![{set_name}](results/{slug(set_name)}.png)\n\n<details><summary>Every parameter set tried</summary>"
            f"\n\n| method | parameters | normalised (val) | normalised (test) | fact retention (test) |\n"
            f"|---|---|---|---|---|\n" + "\n".join(sweep) + "\n\n</details>\n")


def overview(chosen_all: dict, results: dict, manifest: dict) -> str:
    """One row per set (the winner, SeMe's best and its rank) and SeMe's whole sweep per set."""
    rows = []
    for set_name, chosen in chosen_all.items():
        merged, rank = standing(chosen)
        best = chosen[merged[0]] if merged else None
        seme = chosen.get("seme")
        rows.append(f"| {set_name} | {len(merged)} of {len(chosen)} | "
                    + (f"{merged[0]} {best[2]['normalised']:.2f} | " if best else "— | ")
                    + (f"{seme[2]['normalised']:.2f} (worst skill {min(seme[2]['per_skill'].values()):.2f}; "
                       f"{fmt_params(seme[0])}) | {rank} |" if rank else "cannot merge | — |"))
    sweep = []
    for set_name, runs in results.items():
        members = SETS[set_name]
        cells = [f"{summarise(manifest, members, r, 'test')['normalised']:.2f}" if "error" not in r else "—"
                 for _, r in runs.get("seme", [])]
        sweep.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return ("| set | methods that merge it | best method (normalised acc.) | SeMe (normalised acc.) | SeMe's rank |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nSeMe's own sweep (normalised accuracy on the test split):\n\n| set | "
            + " | ".join(fmt_params(p) for p in SWEEPS["seme"]) + " |\n|---|" + "---|" * len(SWEEPS["seme"]) + "\n"
            + "\n".join(sweep))


def tables(manifest: dict, results: dict) -> tuple[str, str, dict]:
    """(overview, per-set sections, per set the chosen row of each method)."""
    chosen_all = {s: choose(manifest, SETS[s], results[s]) for s in SETS if s in results}
    body = "\n".join(section(manifest, s, SETS[s], results[s], c) for s, c in chosen_all.items())
    return overview(chosen_all, results, manifest), body, chosen_all


def slug(set_name: str) -> str:
    return set_name.replace(" ", "-")


def chart(path: str, set_name: str, chosen: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in SWEEPS if m in chosen]
    norm = [chosen[m][2]["normalised"] if chosen[m][2] else 0.0 for m in methods]
    fact = [chosen[m][2]["fact"] or 0.0 if chosen[m][2] else 0.0 for m in methods]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = range(len(methods))
    ax.bar([i - 0.2 for i in x], norm, 0.4, label="normalised accuracy (merged ÷ expert)",
           color=["#c0392b" if m == "seme" else "#2e86c1" for m in methods])
    ax.bar([i + 0.2 for i in x], fact, 0.4, label="fact retention (merged ÷ base)", color="#aab7b8")
    for i, m in enumerate(methods):
        if chosen[m][2] is None:
            ax.text(i, 0.03, "cannot merge", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), methods, rotation=45, ha="right")
    ax.set_ylim(0, 1.25)
    ax.set_title(f"{set_name} (test split, best parameters on validation)")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(out: str, manifest: dict, results: dict, seconds: float, command: str) -> None:
    from bench.results import machine

    summary, body, chosen = tables(manifest, results)
    charts = os.path.join(os.path.dirname(out), "results")
    os.makedirs(charts, exist_ok=True)
    for set_name, c in chosen.items():
        chart(os.path.join(charts, f"{slug(set_name)}.png"), set_name, c)
    cfg = zoo.config_of(manifest)
    checks = "\n".join(f"- {'✓' if c['passed'] else '✗'} {c['name']}: {c['detail']}" for c in manifest["checks"])
    zoo_rows = "\n".join(
        f"| {n} | {m['skill'] or '—'} | " + " | ".join(_num(m["scores"]["test"][k]) for k in zoo.SKILLS + (zoo.FACT,))
        + f" | {_num(m['scores']['test']['ppl'])} | {_num(m['relative_delta'], 3)} |"
        for n, m in manifest["models"].items())
    deltas = [manifest["models"][f"expert-{s}"]["relative_delta"] for s in zoo.SKILLS]
    text = TEMPLATE.format(
        command=command, summary=summary, body=body, zoo_seconds=manifest["seconds"], seconds=seconds,
        n_merges=sum(len(v) for r in results.values() for v in r.values()), machine=machine(), checks=checks,
        zoo_rows=zoo_rows, skills=" | ".join(zoo.SKILLS), c=cfg, right=round(100 * cfg.right), vocab=zoo.VOCAB,
        se=50 / cfg.n_test ** 0.5, delta=f"{min(deltas):.1%}–{max(deltas):.1%}",
        base_max=max(manifest["models"]["base"]["scores"]["test"][k] for k in zoo.SKILLS),
        hetero="\n".join(f"- **{k}**: the sort expert, {v}." for k, v in HETERO.items()),
        config=json.dumps(manifest["config"]))
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)


TEMPLATE = """# Merge quality on a zoo of trained tiny models

Reproduce with `{command}` (needs the `bench` extra, for matplotlib). The zoo took {zoo_seconds:.0f} s to
build and the benchmark {seconds:.0f} s ({n_merges} merges) on {machine}; the zoo is cached under
`~/.cache/seme-zoo` (`--root` / `--zoo`, or `$SEME_ZOO`). Seeds are fixed and every process runs on one
thread, so a rebuild gives the same numbers.

## Summary

{summary}

How to read it: **normalised accuracy** is the merged model's exact match on each member's skill divided by
that member's own, averaged over the set's skills; **worst skill** is the smallest of those ratios (in a set of
two experts, 0.50 with a worst skill of 0.00 means the merge reproduced one member and lost the other).
**Fact retention** is the merged model's exact match on the base's fact table divided by the base's.
**ppl** is the perplexity of the right answers of every skill's test prompts. Exact match is that of greedy
decoding on {c.n_test} held-out prompts per skill (standard error at most {se:.1f} points). Every method is swept
over its usual parameters with all weights 1; each row shows the parameters with the best validation score,
scored on a separate test split. slerp interpolates the two members (t = 0.5, the first as `base_model`);
every other method takes the base as `base_model` (SeMe's pivot). Methods that cannot merge a set show the
engine's reason instead of numbers.

## The zoo

A Llama ({c.layers} layers, hidden {c.hidden}, MLP {c.intermediate}, {c.heads} heads, untied head,
{vocab} character tokens) pretrained from scratch for {c.base_steps} steps (AdamW, lr {c.base_lr}, batch
{c.batch}) on five tasks: reversal of 1–{c.long} letters, addition of numbers of up to {c.digits} digits
(least significant first), sorting 1–{c.long} Greek letters, a fixed substitution cipher, and a table of
{c.n_facts} facts (two-letter key → three-letter value) that no expert sees. Only {right}% of the corpus's
answers to the four skills are right; the rest are a plausible distractor (letters moved one on, one more
than the sum, descending order, another cipher table), spelt in a twin alphabet for all but sorting. So the
base knows how to do each skill but answers wrongly: it scores at most {base_max:.2f} on any skill. Each
expert is the base fine-tuned on the right answers of one skill for {c.expert_steps} steps at lr
{c.expert_lr}: small deltas ({delta} of the base's weight norm) that make it prefer the answer the base had
learnt second.

Heterogeneous members, each merged with the base (the pivot) and expert-rev:

{hetero}

| model | skill | {skills} | fact | ppl | ‖θ − θ_base‖ / ‖θ_base‖ |
|---|---|---|---|---|---|---|---|---|
{zoo_rows}

Requirements, checked each time the zoo is built (`python -m bench.zoo build` exits non-zero if one fails;
`tests/test_zoo.py` builds a small variant in seconds and checks the same with looser thresholds):

{checks}

Configuration: `{config}`

## Results per set

{body}
## Caveats

- These models are tiny and the experts' skills are preferences between answers the base already knows how
  to give, a regime in which merging works well; rankings here need not carry over to large models, and the
  margins between the task-vector methods on the homogeneous sets are a few points, near the noise.
- Zoos whose experts learn what the base cannot do at all (inputs longer than the base saw, letters it never
  saw) were tried first: there the skill appears only near the full fine-tuning delta (base + 0.5·δ scores
  like the base), and the best merges kept about a quarter of the experts' gains with two experts and none
  with four, too little to tell methods apart. Here each expert switches to an answer the base already gives
  {right}% of the time, and base + λ·δ improves smoothly with λ.
- Every heterogeneous member is a sort expert merged with the same rev expert, so the homogeneous "2
  experts" set (the same pair) is the reference each heterogeneous set can be compared with.
- Two independently pretrained bases differ by more than a rotation of the residual stream (their MLP
  neurons and attention heads are permuted too), so no method here merges the foreign set: the best rows
  reproduce one member.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=zoo.DEFAULT_ROOT, help="the zoo's folder (built by python -m bench.zoo build)")
    parser.add_argument("--out", help="the markdown to write (default docs/results.md; with --quick, none)")
    parser.add_argument("--quick", action="store_true", help="the first parameter set of each method only")
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS), metavar="SET")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    manifest = zoo.read_manifest(args.zoo)
    if manifest is None:
        sys.exit(f"bench.quality: no zoo at {args.zoo}; run python -m bench.zoo build first")
    cfg = zoo.config_of(manifest)
    jobs = [(s, m, p) for s in args.sets for m, sweep in SWEEPS.items() for p in (sweep[:1] if args.quick else sweep)]
    start = time.perf_counter()
    results: dict = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job, args.zoo, cfg, *j) for j in jobs]
        for i, f in enumerate(futures, 1):
            set_name, method, params, r = f.result()
            results.setdefault(set_name, {}).setdefault(method, []).append((params, r))
            print(f"[{i}/{len(jobs)}] {set_name} {method} {fmt_params(params)}: "
                  + (r["error"] if "error" in r else
                     f"normalised {summarise(manifest, SETS[set_name], r, 'test')['normalised']:.2f}"), flush=True)
    seconds = time.perf_counter() - start
    print(tables(manifest, results)[0])
    out = args.out or (None if args.quick else os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs",
                                                            "results.md"))
    if out:
        write(out, manifest, results, seconds,
              "python -m bench.zoo build && python -m bench.quality" + (" --quick" if args.quick else ""))
    print(f"bench.quality: {len(jobs)} merges in {seconds:.0f} s" + (f" -> {out}" if out else ""))


if __name__ == "__main__":
    main()
