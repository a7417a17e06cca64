"""Where a CUDA merge's time goes: device time per kernel (torch.profiler), the wall time per merge and
the host's time to enqueue one, for the CUDA C++ kernels (seme.cuda_merge) on base + 3 tensors.

    python -m bench.cuda_profile [--methods ties,sce] [--dtypes bfloat16,float32] [--size N] [--repeat R]

To compare two builds side by side, run it once per build of seme._C_cuda in one session (the
figures of bench/RESULTS.md's note on the CUDA kernels were taken so).
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.kernels import METHODS, K
from seme.fused_merge import GPU_METHODS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties,sce,breadcrumbs,della")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--size", type=int, default=1 << 26, help="elements per tensor (rows of 4096)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from seme import cuda_merge
    from seme.methods import registry
    from seme.methods.inputs import Inputs

    if not cuda_merge.available():
        raise SystemExit("bench.cuda_profile: needs a GPU and the CUDA extension (seme._C_cuda)")
    device = torch.device("cuda")
    shape = (args.size // 4096, 4096)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(shape, generator=g, device=device)
        tensors = [base.to(dtype)] + [(base + 0.01 * torch.randn(shape, generator=g, device=device)).to(dtype)
                                      for _ in range(K)]
        del base
        for name in args.methods.split(","):
            if name not in GPU_METHODS:
                raise SystemExit(f"bench.cuda_profile: no CUDA kernel for '{name}'")
            inputs = Inputs(tuple(tensors), base_index=0, name="model.layers.0.mlp.down_proj.weight", seed=0)
            params = registry.bind(registry.get(name), METHODS[name], K + 1, 0, "bench")

            def merge():
                return cuda_merge.merge(name, inputs, params, out_dtype=dtype)

            for _ in range(3):
                merge()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeat):
                merge()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.repeat
            start = time.perf_counter()
            merge()  # the host's part alone: the launches return before the kernels end
            enqueue = time.perf_counter() - start
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.repeat):
                    merge()
                torch.cuda.synchronize()
            kernels = sorted(((e.device_time_total / args.repeat, e.count / args.repeat, e.key)
                              for e in prof.key_averages() if e.device_time_total), reverse=True)
            print(f"{name} {dtype_name}: {wall * 1e3:.3f} ms per merge, host enqueue {enqueue * 1e3:.3f} ms, "
                  f"kernels {sum(k[0] for k in kernels) / 1e3:.3f} ms")
            for us, count, key in kernels:
                print(f"  {us:9.1f} us  x{count:<4.1f} {key.replace('seme::cuda::(anonymous namespace)::', '')[:90]}")


if __name__ == "__main__":
    main()
