"""Streaming execution of a plan: read one output tensor's inputs, merge, write, repeat.

Peak memory is one tensor's inputs plus its result; inputs are zero-copy views of memory-mapped
files, so pages are read on demand and dropped by the OS when no longer needed.
"""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import sys
import threading
import time
import warnings

import torch

from seme import distributed
from seme.errors import SemeError
from seme.io.card import write_metadata
from seme.io.writer import ShardWriter
from seme.methods import registry
from seme.methods.inputs import Inputs
from seme.plan import CODE_NAMES, Plan


class Progress:
    """Tensors done, bytes read and GB/s on one self-rewriting stderr line (only on a terminal)."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool):
        self.total_tensors, self.total_bytes, self.enabled = total_tensors, total_bytes, enabled
        self.tensors = self.bytes = 0
        self.start = self._last = time.perf_counter()

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.tensors == self.total_tensors):
            self._last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e9
            sys.stderr.write(f"\r  {self.tensors}/{self.total_tensors} tensors  "
                             f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB  {rate:.2f} GB/s ")
            sys.stderr.flush()

    def finish(self) -> float:
        if self.enabled:
            sys.stderr.write("\n")
        return time.perf_counter() - self.start


def run(plan: Plan, out_dir: str, *, device: str = "cpu", shard_size: int = 5 * 10**9, overwrite: bool = False,
        resume: bool = False, allow_nonfinite: bool = False, progress: bool = False, version: str = "",
        prefetch_bytes: int = 2 * 10**9) -> dict:
    """Execute `plan` into `out_dir`: built in `OUT.seme-partial`, published by rename when complete.

    An existing non-empty `out_dir` is refused unless `overwrite`. A failure after the first write
    keeps the staging folder; `resume` continues from its finished shards (bit-identical result).
    Under torchrun, each rank writes its share of the shards and rank 0 publishes.
    """
    group = distributed.current(device)
    if device.startswith("cuda") and group.world > 1:
        device = f"cuda:{group.local_rank}"
    out_dir = os.path.abspath(out_dir)
    staging = f"{out_dir}.seme-partial"
    error = None
    if group.rank == 0:
        try:
            _prepare_staging(plan, out_dir, staging, overwrite, resume)
        except SemeError as e:
            error = str(e)
    if group.world > 1:
        error = group.broadcast(error)
    if error:
        raise SemeError(error)
    error, stats = None, None
    try:
        stats = _execute(plan, staging, torch.device(device), shard_size, resume, allow_nonfinite,
                         progress and group.rank == 0, _plan_id(plan, shard_size, version), group, prefetch_bytes)
    except OSError as e:
        error = (f"{e.strerror or e} ({e.filename or staging}); the partial merge is kept in {staging}: "
                 f"fix the cause and rerun with --resume")
    except SemeError as e:
        error = str(e)
    if group.world > 1:
        error = group.all_ok(error)
    if error:
        raise SemeError(error)
    if group.rank == 0:
        stats["writer"].write_index()
        if plan.semantic:
            stats["semantic"].write_report(staging)
        write_metadata(staging, plan, version, os.path.basename(out_dir))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.rename(staging, out_dir)
    if group.world > 1:
        torch.distributed.barrier()  # every rank returns once the output is published
    return {k: v for k, v in stats.items() if k not in ("writer", "semantic")}


def _prepare_staging(plan: Plan, out_dir: str, staging: str, overwrite: bool, resume: bool) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise SemeError(f"output folder {out_dir} exists and is not empty (use --overwrite to replace it)")
    if os.path.exists(staging) and not (resume or overwrite):
        raise SemeError(f"an interrupted merge into {out_dir} left {staging}: use --resume to continue it "
                        f"or --overwrite to start over")
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging, exist_ok=True)
    free = shutil.disk_usage(os.path.dirname(out_dir)).free
    if free < plan.output_bytes * 1.01 + 10**6:
        raise SemeError(f"not enough disk space in {os.path.dirname(out_dir)}: the merge writes "
                        f"{plan.output_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free")


def _plan_id(plan: Plan, shard_size: int, version: str) -> str:
    """What a resumed merge must share with the interrupted one: recipe, inputs' files, layout, version."""
    h = hashlib.sha256()
    files = sorted({info.path for m in plan.models for info in m.tensors.values()})
    parts = [plan.recipe.text, version, str(shard_size)]
    parts += [f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files]
    parts += [f"{t.name}:{t.dtype}:{t.shape}" for t in plan.tasks]
    h.update("\n".join(parts).encode())
    return h.hexdigest()


def _execute(plan: Plan, folder: str, device: torch.device, shard_size: int, resume: bool, allow_nonfinite: bool,
             progress: bool, plan_id: str, group, prefetch_bytes: int) -> dict:
    """The streaming loop. Inputs of the next tasks are prefetched (madvise) while the current one
    is merged, and results are written by a background thread, so reads, math and writes overlap."""
    method = registry.get(plan.recipe.merge_method)
    writer = ShardWriter(folder, [(t.name, t.dtype, t.shape, t.nbytes) for t in plan.tasks], shard_size, plan_id,
                         resume=resume, rank=group.rank, world=group.world)
    semantic = plan.semantic.prepare(plan, device) if plan.semantic else None
    tasks = [t for t in plan.tasks if not writer.skip(t.name)]
    bar = Progress(len(tasks), sum(_input_bytes(plan, t) for t in tasks), progress)
    prefetched = 0
    with AsyncWriter(writer) as sink:
        for i, task in enumerate(tasks):
            prefetched = _prefetch(plan, tasks, max(prefetched, i + 1), prefetch_bytes)
            tensors = [plan.models[m].load(name) for m, name in task.inputs]
            if task.copy:
                result = tensors[0]
            else:
                _check_inputs(plan, task, tensors)
                if task.derived:
                    tensors = [semantic.load(d, task.name) if d else t for d, t in zip(task.derived, tensors)]
                dtype = getattr(torch, task.compute_dtype) if task.compute_dtype else None
                tensors = tuple(t.to(device=device, dtype=dtype or t.dtype, non_blocking=True) for t in tensors)
                inputs = Inputs(tensors, task.base_index, task.name, plan.recipe.random_seed)
                result = method.fn(inputs, task.params)
                if isinstance(result, tuple):
                    result, stats = result
                    semantic.record(task.name, stats, inputs, result)
                result = result.to(getattr(torch, CODE_NAMES[task.dtype])).cpu()
                if not allow_nonfinite and not bool(torch.isfinite(result).all()):
                    raise SemeError(f"the merged tensor '{task.name}' contains NaN or Inf "
                                    f"(pass --allow-nonfinite to write it anyway)")
            sink.put(task.name, result)
            bar.update(_input_bytes(plan, task))
    seconds = bar.finish()
    return {"tensors": len(plan.tasks), "input_bytes": plan.input_bytes, "output_bytes": plan.output_bytes,
            "seconds": seconds, "writer": writer, "semantic": semantic}


def _input_bytes(plan: Plan, task) -> int:
    return sum(plan.models[m].tensors[n].nbytes for m, n in task.inputs)


def _prefetch(plan: Plan, tasks, start: int, budget: int) -> int:
    """Ask the OS to read ahead the inputs of tasks[start:] up to `budget` bytes; the next start."""
    end, total = start, 0
    while end < len(tasks) and (end == start or total < budget):
        for m, name in tasks[end].inputs:
            plan.models[m].prefetch(name)
            total += plan.models[m].tensors[name].nbytes
        end += 1
    return end


class AsyncWriter:
    """Writes results on a background thread (pwrite and fsync release the GIL); at most two
    results wait, which bounds the memory they hold. An error there surfaces on the next put."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # re-raised in the merging thread
                    self.error = e

    def put(self, name: str, tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, tensor))

    def __exit__(self, *exc) -> None:
        self.queue.put(None)
        self.thread.join()
        self.writer.close()
        if self.error is not None and exc[0] is None:
            raise self.error


def _check_inputs(plan: Plan, task, tensors) -> None:
    """NaN / Inf in an input is reported (tensor and model named); the merge goes on."""
    for (m, name), t in zip(task.inputs, tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            warnings.warn(f"input tensor '{name}' of {plan.models[m].name} contains NaN or Inf")
