"""Fused CPU kernel vs the plain-torch reference vs mergekit 0.1.5, side by side.

    python -m bench.kernels [--size N] [--repeat R] [--baseline-repeat B] [--threads T]
                            [--methods a,b] [--dtypes float32,bfloat16] [--no-record]

Per method: three fine-tuned tensors of N elements (fp32, then bf16) against a base. Times are
best-of-R for the kernel and the memory copy, best-of-B for the (much slower) reference and
mergekit. GB/s counts one read of the K+1 inputs and one write of the output (the copy: K+1 reads
and writes); the kernel really reads the inputs once per pass (1 to 4 passes by method).
--threads sets both torch's and the kernel's thread count (default: all cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.results import machine, update_section
from seme import _C, fused_merge
from seme.methods import registry
from seme.methods.inputs import Inputs

K = 3
METHODS = {  # name -> parameters (scalars: the same for every model), as both engines take them
    "task_arithmetic": dict(weight=0.5),
    "ties": dict(weight=0.5, density=0.3),
    "dare_ties": dict(weight=0.5, density=0.3),
    "sce": dict(select_topk=0.3),
    "breadcrumbs": dict(weight=0.5, density=0.3),
    "della": dict(weight=0.5, density=0.3, epsilon=0.1),
}


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def mergekit_fn(name, tensors, params):
    try:
        from mergekit.merge_methods import registry as mk_registry
        from mergekit.merge_methods.base import TensorGroup
    except ImportError:
        return None
    method = mk_registry.get(name)
    return lambda: method([TensorGroup.from_tensors(list(tensors), base_index=0, name="t")], parameters=params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1 << 24, help="elements per tensor (default 2^24)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the kernel and the copy (best is kept)")
    parser.add_argument("--baseline-repeat", type=int, default=1, help="runs of the reference and mergekit")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: all cores)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or _C.max_threads()

    load = os.getloadavg()[0]  # other work on the machine skews every column: recorded with the table
    cols = 4096 if args.size % 4096 == 0 else args.size  # LLM-like rows: DELLA ranks along them
    shape = (args.size // cols, cols)
    header = ("| method | dtype | kernel ms | kernel GB/s | reference ms | mergekit ms | copy ms | "
              f"× vs mergekit | × vs reference | kernel / copy |")
    rows = [header, "|" + "---|" * 10]
    print(header)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g)
        tensors = [base.to(dtype)] + [(base + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(K)]
        del base
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copy = best_time(lambda: [t.clone() for t in tensors], args.repeat)
        inputs = Inputs(tuple(tensors), base_index=0, name="model.layers.0.mlp.down_proj.weight", seed=0)
        for name in args.methods.split(","):
            params = registry.bind(registry.get(name), METHODS[name], K + 1, 0, "bench")
            moved = nbytes + tensors[0].numel() * tensors[0].element_size()
            kernel = best_time(lambda: fused_merge.merge(name, inputs, params, out_dtype=dtype, num_threads=threads),
                                args.repeat)
            ref = best_time(lambda: registry.get(name).fn(inputs, params).to(dtype), args.baseline_repeat)
            mk = mergekit_fn(name, tensors, METHODS[name])
            mk_time = best_time(mk, args.baseline_repeat) if mk else float("nan")
            line = (f"| {name} | {dtype_name} | {kernel * 1e3:.1f} | {moved / kernel / 1e9:.1f} | {ref * 1e3:.0f} | "
                    f"{mk_time * 1e3:.0f} | {copy * 1e3:.1f} | {mk_time / kernel:.1f} | {ref / kernel:.1f} | "
                    f"{kernel / copy:.2f} |")
            rows.append(line)
            print(line, flush=True)
        print(f"copy of the {K + 1} {dtype_name} inputs: {copy * 1e3:.1f} ms, {2 * nbytes / copy / 1e9:.1f} GB/s")

    if not args.no_record:
        command = " ".join(["python -m bench.kernels"] + (argv if argv is not None else sys.argv[1:]))
        update_section("kernels", (
            "## Fused CPU kernels vs plain torch vs mergekit\n\n"
            f"`{command}` on {machine()}, {threads} thread(s), kernel build {_C.isa()}, torch {torch.__version__}, "
            f"load average before the run {load:.2f}.\n\n"
            f"Base + {K} fine-tuned tensors of shape {list(shape)}; parameters: "
            + "; ".join(f"{n} {p}" for n, p in METHODS.items()) + ". "
            "kernel: seme.fused_merge (C++/OpenMP). reference: seme.methods (plain torch), output cast to the "
            "dtype. mergekit: 0.1.5's own implementation (computes in the input dtype). copy: `clone()` of the "
            f"{K + 1} inputs, the bandwidth floor. GB/s: (inputs read once + output written once) / kernel time. "
            "Kernel and copy: best of --repeat; reference and mergekit: best of --baseline-repeat.\n\n"
            + "\n".join(rows)))
        print("updated bench/RESULTS.md")


if __name__ == "__main__":
    main()
