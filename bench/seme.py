"""`python -m bench.seme`: time of each SeMe stage against a plain-torch implementation of it, side by side.

Stages: semantic bases (streamed fp64 Gram + Cholesky vs `torch.linalg.pinv`), the mapping
(blockwise online softmax vs a materialised [batch, V] softmax), and alignment (bases → polar
factor). Prints times and ratios; `--device cuda` when a GPU is present.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from bench.results import command_line, machine, update_section
from seme.semantic import alignment
from seme.semantic.bases import block_norms, semantic_bases
from seme.semantic.mapping import semantic_distribution, semantic_mix


def timed(fn, device, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256, help="vectors mapped at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    W = torch.randn(args.vocab, args.hidden, device=device)
    W2 = W @ torch.linalg.qr(torch.randn(args.hidden, args.hidden, device=device))[0]
    print(f"SeMe stages, V={args.vocab} d={args.hidden} batch={args.batch} on {device}")
    rows = []

    t_ours, (bases,) = timed(lambda: semantic_bases([W]), device, args.repeat)
    t_ours_s, S = timed(lambda: bases.materialize(), device, args.repeat)
    t_ref, S_ref = timed(lambda: torch.linalg.pinv(W).T, device, args.repeat)
    err = float((S.double() - S_ref.double()).norm() / S_ref.double().norm())
    rows.append(("bases: Gram+Cholesky (+rows) vs pinv", t_ours + t_ours_s, t_ref, f"rel. diff {err:.1e}"))

    keys = torch.nn.functional.normalize(S, dim=1)
    q = torch.randn(args.batch, args.hidden, device=device)
    values = torch.randn(args.vocab, args.hidden, device=device)
    t_ours, mixed = timed(lambda: semantic_mix(q, keys, values, temperature=0.05), device, args.repeat)
    t_ref, ref = timed(lambda: semantic_distribution(q, keys, 0.05) @ values, device, args.repeat)
    err = float((mixed - ref).abs().max())
    rows.append(("mapping: online softmax vs materialised", t_ours, t_ref, f"max diff {err:.1e}, "
                 f"saves a [{args.batch}, {args.vocab}] matrix"))

    def align_ours():  # as the pipeline runs it: from W and G⁻¹, the bases never formed
        a, b = semantic_bases([W2, W])
        return alignment.orthogonal_factor(alignment.alignment_map(a, b))

    def align_ref():
        sa = torch.nn.functional.normalize(torch.linalg.pinv(W2).T, dim=1)
        sb = torch.nn.functional.normalize(torch.linalg.pinv(W).T, dim=1)
        U, _, Vh = torch.linalg.svd(sb.T @ sa)
        return U @ Vh

    t_ours, Q = timed(align_ours, device, args.repeat)
    t_ref, Q_ref = timed(align_ref, device, args.repeat)
    rows.append(("alignment of two heads", t_ours, t_ref, f"max diff {float((Q - Q_ref).abs().max()):.1e}"))

    if device.type == "cuda":  # the fused Triton norms against the block products they replace
        from seme.kernels import semantic_bases as kernel
        fp32 = dataclasses.replace(bases, inverse=bases.inverse.float())
        t_ours, n = timed(lambda: kernel.basis_norms(W, fp32.inverse), device, args.repeat)
        t_ref, n_ref = timed(lambda: block_norms(fp32), device, args.repeat)
        rows.append(("basis norms: Triton (no S tile stored) vs block products", t_ours, t_ref,
                     f"max rel. diff {float(((n - n_ref) / n_ref).abs().max()):.1e}"))

    table = ["| stage | seme s | plain torch s | speed-up | note |", "|---|---|---|---|---|"]
    table += [f"| {name} | {ours:.3f} | {ref:.3f} | {ref / ours:.1f}x | {note} |" for name, ours, ref, note in rows]
    print("\n".join(table))
    command = command_line("bench.seme", argv if argv is not None else sys.argv[1:])
    update_section(f"seme-{device.type}", f"## SeMe stages vs plain torch ({device.type})\n\n`{command}` on {machine()}, {device}, "
                           f"load average before the run {load:.2f}; V={args.vocab}, d={args.hidden}, "
                           f"batch={args.batch}.\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
