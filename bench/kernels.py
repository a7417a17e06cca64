"""Fused kernels vs the plain-torch reference vs mergekit 0.1.5, side by side, on one device.

    python -m bench.kernels [--device cpu|cuda] [--size N] [--repeat R] [--baseline-repeat B]
                            [--threads T] [--methods a,b] [--dtypes float32,bfloat16,float16] [--no-record]

Per method: three fine-tuned tensors of N elements (fp32, bf16, then fp16) against a base. Kernels: the
C++/OpenMP one on CPU; on CUDA the Triton ones and the CUDA C++ one (where it is built), each
timed on the methods it covers (the CUDA C++ one: the task-vector family and SCE). Times are best-of-R for the kernels and the memory copy, best-of-B for the (much slower)
reference and mergekit. GB/s counts one read of the K+1 inputs and one write of the output (the
copy: K+1 reads and writes); the kernels really read the inputs once per pass (1 to 4 passes by
method). --threads sets both torch's and the CPU kernel's thread count (default: all cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.results import command_line, cpu_build, machine, update_section
from seme import fused_merge
from seme.methods import registry
from seme.methods.inputs import Inputs

K = 3
INPUTS = {"slerp": 2}  # methods that take fewer than the K + 1 tensors: the first ones
METHODS = {  # name -> parameters (scalars: the same for every model), as both engines take them
    "linear": dict(weight=0.25),
    "task_arithmetic": dict(weight=0.5),
    "ties": dict(weight=0.5, density=0.3),
    "dare_ties": dict(weight=0.5, density=0.3),
    "sce": dict(select_topk=0.3),
    "breadcrumbs": dict(weight=0.5, density=0.3),
    "della": dict(weight=0.5, density=0.3, epsilon=0.1),
    "lrp": dict(density=0.3),  # not in mergekit 0.1.5: its column is nan
    "slerp": dict(t=0.3),  # base and the first fine-tune: SLERP takes two
    "model_stock": dict(),
    "ram": dict(epsilon=0.01),  # the deltas' scale: about a third of each model's changes count
    "ramplus_tl": dict(epsilon=0.01),
}


def best_time(fn, repeat: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def kernels(device: torch.device, threads: int) -> dict:
    """name -> (merge(method, inputs, params, out_dtype), the methods it covers) of every fused kernel
    built for the device."""
    if device.type == "cpu":
        return {"C++": (lambda m, i, p, dt: fused_merge.merge(m, i, p, out_dtype=dt, num_threads=threads),
                        fused_merge.METHODS)}
    from seme import cuda_merge
    from seme.kernels import fused_merge as triton_merge
    from seme.kernels import linear_merge as triton_linear

    def triton(m, i, p, dt):
        return (triton_linear if m in triton_linear.SUPPORTED else triton_merge).fused_merge(m, i, p, out_dtype=dt)

    found = {"triton": (triton, fused_merge.METHODS)}
    if cuda_merge.available():
        found["cuda"] = (lambda m, i, p, dt: cuda_merge.merge(m, i, p, out_dtype=dt), fused_merge.GPU_METHODS)
    return found


def mergekit_fn(name, tensors, params):
    try:
        from mergekit.merge_methods import registry as mk_registry
        from mergekit.merge_methods.base import TensorGroup
    except ImportError:
        return None
    try:
        method = mk_registry.get(name)
    except RuntimeError:  # a method mergekit 0.1.5 lacks (lrp came later)
        return None
    return lambda: method([TensorGroup.from_tensors(list(tensors), base_index=0, name="t")], parameters=params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, default=1 << 24, help="elements per tensor (default 2^24)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the kernels and the copy (best is kept)")
    parser.add_argument("--baseline-repeat", type=int, default=1, help="runs of the reference and mergekit")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--threads", type=int, default=0, help="torch and CPU kernel threads (0: all cores)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    impls = kernels(device, threads)

    load = os.getloadavg()[0]  # other work on the machine skews every column: recorded with the table
    cols = 4096 if args.size % 4096 == 0 else args.size  # LLM-like rows: DELLA ranks along them
    shape = (args.size // cols, cols)
    names = list(impls)
    header = ("| method | dtype | " + " | ".join(f"{n} ms | {n} GB/s" for n in names)
              + " | reference ms | mergekit ms | copy ms | × vs mergekit | × vs reference | fastest / copy |")
    rows = [header, "|" + "---|" * (8 + 2 * len(names))]
    print(header)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g)
        tensors = [base.to(dtype)] + [(base + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(K)]
        tensors = [t.to(device) for t in tensors]
        del base
        copies = {}  # number of inputs -> time of their copy
        for name in args.methods.split(","):
            covering = [n for n, (_, methods) in impls.items() if name in methods]
            if not covering:
                continue  # the device runs it in torch
            count = INPUTS.get(name, K + 1)
            used = tensors[:count]
            if count not in copies:
                copies[count] = best_time(lambda: [t.clone() for t in used], args.repeat, device)
            copy = copies[count]
            inputs = Inputs(tuple(used), base_index=0, name="model.layers.0.mlp.down_proj.weight", seed=0)
            params = registry.bind(registry.get(name), METHODS[name], count, 0, "bench")
            nbytes = sum(t.numel() * t.element_size() for t in used)
            moved = nbytes + tensors[0].numel() * tensors[0].element_size()
            times = {n: best_time(lambda: impls[n][0](name, inputs, params, dtype), args.repeat, device)
                     for n in covering}
            fastest = min(times.values())
            ref = best_time(lambda: registry.get(name).fn(inputs, params).to(dtype), args.baseline_repeat, device)
            mk = mergekit_fn(name, used, METHODS[name])
            mk_time = best_time(mk, args.baseline_repeat, device) if mk else float("nan")
            line = (f"| {name} | {dtype_name} | "
                    + " | ".join(f"{times[n] * 1e3:.2f} | {moved / times[n] / 1e9:.1f}" if n in times else "- | -"
                                 for n in names)
                    + f" | {ref * 1e3:.1f} | {mk_time * 1e3:.1f} | {copy * 1e3:.2f} | {mk_time / fastest:.1f} | "
                    f"{ref / fastest:.1f} | {fastest / copy:.2f} |")
            rows.append(line)
            print(line, flush=True)
        for count, copy in copies.items():
            size = count * tensors[0].numel() * tensors[0].element_size()
            print(f"copy of {count} {dtype_name} inputs: {copy * 1e3:.2f} ms, {2 * size / copy / 1e9:.1f} GB/s")

    if not args.no_record:
        command = command_line("bench.kernels", argv if argv is not None else sys.argv[1:])
        section = title = device.type
        if device.type == "cpu":
            build = cpu_build()
            section, title = f"cpu-{build}", f"cpu, kernel build {build}"
            where = (f"{threads} thread(s), kernel build {build}, torch {torch.__version__}, "
                     f"load average before the run {load:.2f}")
            kernel_text = "C++: seme.fused_merge (C++/OpenMP)"
        else:
            import triton

            where = f"torch {torch.__version__}, triton {triton.__version__}"
            kernel_text = ("triton: seme.kernels.fused_merge, and seme.kernels.linear_merge for linear, slerp, "
                           "model_stock, ram and ramplus_tl; cuda: seme.cuda_merge (CUDA C++), where built, for the "
                           "task-vector family and sce (-: not covered). The copy's own rate (2 x input bytes / copy "
                           "ms) is the device's practical bandwidth")
        update_section(f"kernels-{section}", (
            f"## Fused kernels vs plain torch vs mergekit ({title})\n\n"
            f"`{command}` on {machine()}, {where}.\n\n"
            f"Base + {K} fine-tuned tensors of shape {list(shape)}; parameters: "
            + "; ".join(f"{n} {p}" for n, p in METHODS.items()) + f". {kernel_text}. "
            "reference: seme.methods (plain torch), output cast to the dtype. mergekit: 0.1.5's own "
            "implementation (computes in the input dtype). copy: `clone()` of the "
            f"{K + 1} inputs (SLERP: of its 2), the bandwidth floor. GB/s: (inputs read once + output written once) / kernel time. "
            "Kernels and copy: best of --repeat; reference and mergekit: best of --baseline-repeat.\n\n"
            + "\n".join(rows)))
        print("updated bench/RESULTS.md")


if __name__ == "__main__":
    main()
