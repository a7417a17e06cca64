"""`python -m bench.e2e`: whole merges, seme against mergekit-yaml on the same recipes, one after the other.

Generates random Llama-shaped models (base + fine-tunes with dense deltas, bf16; sizes are
options), then for each recipe runs `python -m seme.merge` and `mergekit-yaml` as separate
processes and reports wall time (start-up included), peak RSS, input GB/s, seme's steady-state
rate (start-up excluded) and the ratios, plus the machine's plain read bandwidth of the same files.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import torch

import seme
from bench.results import command_line, cpu_build, machine, update_section

RECIPES = {
    "linear": lambda m: {"merge_method": "linear",
                         "models": [{"model": p, "parameters": {"weight": 1.0}} for p in m]},
    "task_arithmetic": lambda m: {"merge_method": "task_arithmetic", "base_model": m[0],
                                  "models": [{"model": p, "parameters": {"weight": 0.5}} for p in m[1:]]},
    "ties": lambda m: {"merge_method": "ties", "base_model": m[0],
                       "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.3}} for p in m[1:]]},
    "dare_ties": lambda m: {"merge_method": "dare_ties", "base_model": m[0],
                            "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.3}} for p in m[1:]]},
    "sce": lambda m: {"merge_method": "sce", "base_model": m[0], "parameters": {"select_topk": 0.3},
                      "models": [{"model": p} for p in m[1:]]},
    # epsilon at the deltas' scale (make_models: std 0.002): about a third of each model's changes count
    "ram": lambda m: {"merge_method": "ram", "base_model": m[0], "parameters": {"epsilon": 0.002},
                      "models": [{"model": p} for p in m[1:]]},
    # alignment "always": random heads are within align_tolerance of each other, and "auto" would skip
    # the rotations a real SeMe merge spends its pre-pass on
    "seme": lambda m: {"merge_method": "seme", "base_model": m[0], "parameters": {"alignment": "always"},
                       "models": [{"model": p} for p in m[1:]]},
}
SEME_ONLY = {"seme"}  # recipes mergekit has no method for: timed for seme alone


SHARD_BYTES = 2 * 10**9  # larger models are written in shards of about this size, with an index, as hubs hold them


def make_models(root: str, n_models: int, hidden: int, layers: int, vocab: int, intermediate: int) -> list[str]:
    """Random Llama checkpoints written directly (no transformers needed): a base and fine-tunes.
    One fine-tune's shard at a time is held beside the base, so models larger than memory can be made."""
    from safetensors.torch import save_file

    kv = hidden // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "max_position_embeddings": 2048, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    shards, size = [[]], 0
    for name, tensor in base.items():
        if size + tensor.nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    paths = []
    for i in range(n_models):
        path = os.path.join(root, f"model{i}")
        paths.append(path)
        if os.path.exists(os.path.join(path, "config.json")):  # written last: the model is complete
            continue
        os.makedirs(path, exist_ok=True)
        for file, names in zip(files, shards):
            state = {k: base[k] if i == 0 else (base[k].float() + torch.randn(base[k].shape, generator=g) * 0.002)
                     .to(torch.bfloat16) for k in names}
            save_file(state, os.path.join(path, file), metadata={"format": "pt"})
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in base.values())},
                     "weight_map": {k: file for file, names in zip(files, shards) for k in names}}
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return paths


def run(cmd: list[str], cwd: str, inputs: list[str], cached: bool, out: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) of the process, and its stderr. Each run starts alike: no output
    folder, the previous run's writes flushed, and the `inputs` read into the page cache again (this
    machine's page cache loses pages of idle files within seconds, whatever memory is free) or, not
    `cached` (inputs larger than memory), dropped from it. The peak is the child's own high-water mark,
    sampled as it runs: wait4's ru_maxrss would count this process's memory, from which the child
    was forked (the models this process made, gigabytes for large ones)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cached:
        read_bandwidth(inputs)
    else:
        evict(inputs)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, high_water(proc.pid))
        time.sleep(0.005)
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[0][-2000:]}")
    return wall, peak / 1e9, err[0]


def high_water(pid: int) -> int:
    """A running process's peak resident bytes (VmHWM); 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def weights(path: str) -> list[str]:
    """A model folder's safetensors files."""
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def evict(paths: list[str]) -> None:
    """Drop the models' files from the page cache, so that they are read from disk again."""
    for path in paths:
        for f in weights(path):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_bandwidth(paths: list[str]) -> float:
    files = [f for p in paths for f in weights(p)]
    total = sum(os.path.getsize(f) for f in files)
    buffer = bytearray(1 << 24)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.readinto(buffer):
                pass
    return total / (time.perf_counter() - start) / 1e9


def write_seconds(folder: str, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file and flush it to the device, as a merge's output is."""
    path = os.path.join(folder, "write-probe.bin")
    block = memoryview(os.urandom(1 << 22) * 16)  # 64 MiB; slices of a memoryview copy nothing
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, nbytes, len(block)):
            f.write(block[:nbytes - offset])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/seme-e2e", help="where models and outputs go")
    parser.add_argument("--models", type=int, default=4, help="base + fine-tunes")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--no-mergekit", action="store_true", help="time seme only (printed, not recorded)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="seme runs per recipe, the median reported (mergekit: one run, 10-50x longer)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    os.makedirs(args.root, exist_ok=True)
    # Both tools start from bytecode, as an installed package does (pip compiles mergekit's and torch's at
    # install; a checkout run where PYTHONDONTWRITEBYTECODE is set would compile seme's sources every run).
    compileall.compile_dir(os.path.dirname(seme.__file__), quiet=1)
    paths = make_models(args.root, args.models, args.hidden, args.layers, args.vocab, args.intermediate)
    out_bytes = sum(os.path.getsize(f) for f in weights(paths[0]))
    in_bytes = out_bytes * len(paths)
    params = out_bytes / 2 / 1e6
    load = os.getloadavg()[0]  # other work on the machine skews every column: recorded with the table
    cached = in_bytes < 0.6 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # else read from disk
    source = "page cache" if cached else "disk (the inputs exceed memory)"
    os.sync()
    if cached:
        read_bandwidth(paths)  # warm the page cache, as a repeated merge would find it
    else:
        evict(paths)
    bandwidth = read_bandwidth(paths)
    # read the inputs, write the output; a floor, so the best of three writes (the disk is noisy)
    floor = in_bytes / 1e9 / bandwidth + min(write_seconds(args.root, out_bytes) for _ in range(3))
    print(f"{args.models} models of {params:.0f}M parameters (bf16), {in_bytes / 1e9:.2f} GB in; "
          f"plain read from {source} {bandwidth:.2f} GB/s; read + write floor {floor:.2f} s", flush=True)
    mergekit = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    header = ("| recipe | seme s | seme start-up s | seme RSS GB | seme steady GB/s | mergekit s | mergekit RSS GB | "
              "speed-up | seme / floor | steady / read bandwidth |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.recipes.split(","):
        recipe = {**RECIPES[name](paths), "dtype": "bfloat16"}
        recipe_path = os.path.join(args.root, f"{name}.yml")
        with open(recipe_path, "w") as f:
            json.dump(recipe, f)  # JSON is YAML
        out = os.path.join(args.root, "out-seme")
        runs = []
        for _ in range(args.repeat):
            wall, rss, err = run([sys.executable, "-m", "seme.merge", recipe_path, out, "--device", args.device],
                                 args.root, paths, cached, out)
            loop = re.search(r"([\d.]+) GB/s\) in ([\d.]+) s", err)
            runs.append((wall, rss, float(loop.group(1)), wall - float(loop.group(2))))
        seme_s, seme_rss, steady, startup = sorted(runs)[len(runs) // 2]  # the median run by wall time
        mk_s = mk_rss = float("nan")
        if not args.no_mergekit and name not in SEME_ONLY:
            mk_out = os.path.join(args.root, "out-mergekit")
            mk_cmd = [mergekit, recipe_path, mk_out, "--no-copy-tokenizer", "--allow-crimes", "--out-shard-size", "5B"]
            mk_s, mk_rss, _ = run(mk_cmd + (["--cuda"] if args.device == "cuda" else []), args.root, paths, cached, mk_out)
        mk = ("| — | — | — |" if mk_s != mk_s else  # NaN: not run
              f"| {mk_s:.1f} | {mk_rss:.2f} | {mk_s / seme_s:.1f}x |")
        row = (f"| {name} | {seme_s:.1f} | {startup:.2f} | {seme_rss:.2f} | {steady:.2f} {mk} "
               f"{seme_s / floor:.1f}x | {steady / bandwidth:.2f} |")
        rows.append(row)
        print(row, flush=True)
    if args.no_mergekit:
        return
    command = command_line("bench.e2e", argv if argv is not None else sys.argv[1:])
    build = cpu_build()
    kind = torch.device(args.device).type
    # On the CPU each kernel build has its sections; a GPU merge hardly runs them.
    section, title = (f"e2e-cpu-{build}", f"cpu, kernel build {build}") if kind == "cpu" else (f"e2e-{kind}", kind)
    if not all(getattr(args, k) == parser.get_default(k) for k in ("models", "hidden", "layers", "intermediate", "vocab")):
        section, title = f"{section}-{params:.0f}M", f"{title}, {params:.0f}M-parameter models"
    start = ("Every run starts with its inputs in the page cache and no output folder." if cached else
             "The inputs do not fit in memory: every run (and the plain read) starts with none of them in the page "
             "cache, and no output folder; a disk's cold read rate drifts between runs, so the floor is approximate "
             "and seme / floor can fall below 1.")
    update_section(section, f"## End to end: seme vs mergekit-yaml ({title})\n\n`{command}` on {machine()}, "
                          f"kernel build {build}, load average before the run {load:.2f}.\n"
                          f"{args.models} Llama-shaped models of {params:.0f}M parameters (bf16, dense deltas), "
                          f"{in_bytes / 1e9:.2f} GB of input; plain read of the same files from {source}: "
                          f"{bandwidth:.2f} GB/s; *floor*: that read plus the best of three writes (and fsync) of the "
                          f"output's bytes, {floor:.2f} s. {start} Times are whole processes, seme's the median of {args.repeat} runs "
                          f"(mergekit: one); *start-up* is seme's time outside its merge loop (imports, planning, "
                          f"publishing), *steady* its loop's input rate.\n\n{header}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
