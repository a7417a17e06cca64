"""Streaming execution of a plan: merge one output tensor from its inputs, write it to its place
in the output, repeat.

Inputs are zero-copy views of memory-mapped files, so the merge reads page-cache pages; each
tensor's input pages are unmapped once it is done, and results go through a few reused staging
buffers: resident memory holds about one tensor's inputs and three results, whatever the size of
the models.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import queue
import shutil
import sys
import threading
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from seme import distributed, fused_merge
from seme.engine import make_engine, native_serves, native_takes, reference_bytes, remapped_bytes, torch_host_bytes
from seme.errors import SemeError
from seme.io.card import write_metadata
from seme.io.model import CHAT_TEMPLATES, is_tokenizer_file
from seme.io.writer import ShardWriter, clear
from seme.options import format_size
from seme.plan import DTYPE_SIZES, Plan
from seme.semantic import memory


class Progress:
    """Tensors done and the rates of the stages (merge: input bytes over the time spent merging,
    the reads included where inputs are read through their mappings as the merge touches them;
    read, on a GPU: input bytes over the time the background readers staging them were busy;
    write: output bytes over the time spent checksumming, writing and flushing) on one
    self-rewriting stderr line, shown only on a terminal."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool):
        self.total_tensors, self.total_bytes, self.enabled = total_tensors, total_bytes, enabled
        self.tensors = self.bytes = 0
        self.busy = {"read": [0.0, 0], "merge": [0.0, 0], "write": [0.0, 0]}  # stage -> [seconds, bytes]
        self.start = self._last = time.perf_counter()

    def stage(self, name: str, seconds: float, nbytes: int) -> None:
        self.busy[name][0] += seconds
        self.busy[name][1] += nbytes

    def rate(self, name: str) -> float:
        seconds, nbytes = self.busy[name]
        return nbytes / seconds / 1e9 if seconds > 0 else 0.0

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.tensors == self.total_tensors):
            self._last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e9
            read = f"read {self.rate('read'):.1f} GB/s, " if self.busy["read"][1] else ""
            sys.stderr.write(f"\r  {self.tensors}/{self.total_tensors} tensors  "
                             f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB  {rate:.2f} GB/s  ({read}merge "
                             f"{self.rate('merge'):.1f} GB/s in, write {self.rate('write'):.1f} GB/s out) ")
            sys.stderr.flush()

    def finish(self) -> float:
        if self.enabled:
            sys.stderr.write("\n")
        return time.perf_counter() - self.start


# Without --max-memory, or what the largest tensor needs if that is more (its read-ahead then is one
# tensor). Counting the read-ahead on top of the largest tensor instead raised the resident memory of
# bench.e2e's merges from 0.68 to 0.81 GB.
DEFAULT_MEMORY = 4 * 10**9


def rank_device(device: str, group: distributed.Group) -> str:
    """The GPU a rank merges on: under torchrun, `cuda` is the rank's local GPU, ranks past the node's
    GPU count sharing them in turn (two ranks on one GPU overlap their reads); `cuda:N` is N for all."""
    if device != "cuda" or group.world == 1:
        return device
    import torch

    return f"cuda:{group.local_rank % torch.cuda.device_count()}"


def run(plan: Plan, out_dir: str, *, device: str = "cpu", backend: str = "auto", shard_size: int = 5 * 10**9,
        overwrite: bool = False, resume: bool = False, allow_nonfinite: bool = False, progress: bool = False,
        version: str = "", max_memory: int | None = None, direct_io: bool = True, tokenizer: bool = True,
        card: bool = True) -> dict:
    """Execute `plan` into `out_dir`: built in `OUT.seme-partial`, published by rename when complete.

    An existing non-empty `out_dir` is refused unless `overwrite`. A failure after the first write
    keeps the staging folder; `resume` continues from its finished shards (bit-identical result).
    Under torchrun, each rank writes its share of the tensors and rank 0 publishes. `max_memory`
    bounds the bytes held at once: read-ahead inputs, the tensor being merged and results waiting
    to be written (None: DEFAULT_MEMORY, or `least_memory` if more). With `direct_io`, shards are
    written around the page cache where the filesystem allows it (`seme.io.writer`). `tokenizer` and `card`: whether the output gets the reference's
    tokenizer files and a model card (`seme.io.card.write_metadata`).
    """
    loop, prepass = least_memory(plan, device, memory_backend(backend, allow_nonfinite))
    if max_memory is None:
        max_memory = max(DEFAULT_MEMORY, loop, prepass)
    if loop > max_memory:
        kept = "".join([", the buffers staging inputs to the GPU" if device != "cpu" else "",
                        " and what SeMe keeps from its alignment pre-pass" if plan.semantic is not None else ""])
        raise SemeError(f"--max-memory {format_size(max_memory)} is below what the largest tensor needs "
                        f"(inputs, their adapted or re-mapped copies, the method's temporaries, result and two "
                        f"results waiting to be written{kept}: {format_size(loop, up=True)})")
    if prepass > max_memory:
        raise SemeError(f"--max-memory {format_size(max_memory)} is below what SeMe's alignment pre-pass needs "
                        f"(each model's G⁻¹ and row norms, the rotations, one head's factorisation or one source's "
                        f"alignment: {format_size(prepass, up=True)})")
    group = distributed.current()
    device = rank_device(device, group)
    out_dir = os.path.abspath(out_dir)
    if os.path.islink(out_dir):  # the folder it names is replaced (renaming onto the link fails), and the link stays
        out_dir = os.path.realpath(out_dir)
    staging = f"{out_dir}.seme-partial"
    # Under torchrun, a rank that fails leaves this file: the others stop at their next tensor
    # instead of merging the rest of their share before they hear of it.
    stop = os.path.join(staging, STOP_FILE) if group.world > 1 else None
    error, lock, stats = None, None, None
    try:
        if group.rank == 0:
            try:
                lock = _prepare_staging(plan, out_dir, staging, overwrite, resume)
            except SemeError as e:
                error = str(e)
            except BaseException as e:
                _fail_alone(group, e)
        _agree(group, error)
        # each rank's warnings while merging its share, said by rank 0 (Group.agree)
        with warnings.catch_warnings(record=True) if group.world > 1 else contextlib.nullcontext([]) as warned:
            try:
                stats = _execute(plan, staging, device, backend, shard_size, resume, allow_nonfinite,
                                 progress and group.rank == 0, _plan_id(plan, shard_size, version, device, backend),
                                 group, max_memory, max_memory - loop, direct_io, stop)
            except _Stopped:  # another rank failed: its error comes with the agreement below
                pass
            except OSError as e:
                error = (f"{e.strerror or e} ({e.filename or staging}); the partial merge is kept in {staging}: "
                         f"fix the cause and rerun with --resume")
            except SemeError as e:
                error = str(e)
            except BaseException as e:
                if stop:
                    _stop_others(stop)
                _fail_alone(group, e)
            if error and stop:
                _stop_others(stop)
        _agree(group, error, [str(w.message) for w in warned])
        if group.rank == 0:
            try:
                _publish(plan, stats, staging, out_dir, version, tokenizer, card)
            except OSError as e:
                error = (f"{e.strerror or e} ({e.filename or staging}) while finishing the merge; the partial "
                         f"merge is kept in {staging}: fix the cause and rerun with --resume")
            except BaseException as e:
                _fail_alone(group, e)
    finally:
        if lock is not None:
            os.close(lock)
    _agree(group, error)  # every rank returns once the output is published
    return {k: v for k, v in stats.items() if k not in ("writer", "semantic")}


def _agree(group, error: str | None, said: list[str] = ()) -> None:
    """Raise the first error of any rank (this one's, in a single process)."""
    if group.world > 1 and not distributed.agreed_failure():  # else the ranks agreed on it (`Group.share`)
        error = group.agree(error, said)
    if error:
        raise SemeError(error)


def _fail_alone(group, e: BaseException):
    """Re-raise an unexpected exception (a bug, an interruption) on this rank, once the other ranks
    have heard of it: they stop and say so, rather than fail on the connection this process closes."""
    if group.world > 1:
        group.agree(f"rank {group.rank} failed: {type(e).__name__}" + (f": {e}" if str(e) else ""))
    raise e


STOP_FILE = "seme-stop"


class _Stopped(Exception):
    """Raised on a rank that finds another rank's STOP_FILE between two tensors."""


def _stop_others(stop: str) -> None:
    with contextlib.suppress(OSError):  # at worst the others stop at the end of their share
        open(stop, "w").close()


def _publish(plan: Plan, stats: dict, staging: str, out_dir: str, version: str, tokenizer: bool, card: bool) -> None:
    """Index, report and metadata into the staging folder, then the renames that make it the output."""
    writer = stats["writer"]
    writer.remove_others()
    writer.write_index()
    if plan.semantic:
        stats["semantic"].write_report(staging, writer.all_notes())
    write_metadata(staging, plan, version, os.path.basename(out_dir), tokenizer, card)
    writer.remove_manifests()  # last: a merge stopped before this point resumes with its shards kept
    _sync_files(staging)
    # The output being replaced is moved aside whole, not deleted in place: a merge killed while
    # deleting it left OUT with its index and config but not all of its shards.
    replaced = f"{out_dir}.seme-replaced"
    if os.path.lexists(replaced):  # from a merge killed between the two renames
        shutil.rmtree(replaced)
    if os.path.exists(out_dir):
        os.rename(out_dir, replaced)
    os.rename(staging, out_dir)
    _sync_folder(os.path.dirname(out_dir))  # the rename itself
    shutil.rmtree(replaced, ignore_errors=True)


def _sync_files(folder: str) -> None:
    """Flush to disk what the publication wrote into `folder` (index, config, card, tokenizer files) and
    the folders' entries, before the rename makes it the output: else a power cut just after it could
    leave an output with, say, an empty index. Shards were flushed as they were finished."""
    for path, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".safetensors"):
                fd = os.open(os.path.join(path, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _sync_folder(path)


def _sync_folder(path: str) -> None:
    """Flush a folder's entries (names created, renamed or removed in it); some filesystems take no
    fsync of a folder, and there is nothing more to do for them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# What --overwrite may delete: the files of a model folder (a previous merge, any Hugging Face
# checkpoint: its tokenizer's files and named chat templates too). Anything else in the output folder
# (another file, another subfolder) stops the merge, so that a mistyped output path costs nobody their files.
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".md", ".bin", ".model", ".txt", ".jinja", ".py", ".yml", ".yaml",
                        ".tiktoken", ".gitattributes")


def _check_output(plan: Plan, out_dir: str, overwrite: bool) -> None:
    """Refuse an output path that is a file, is or holds an input of the merge (publishing replaces
    the folder), or, with `overwrite`, holds what a model folder does not."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SemeError(f"output path {out_dir} is a file, not a folder")
    if os.path.ismount(out_dir):  # checked now: renaming the merge into its place fails once it is done
        raise SemeError(f"output folder {out_dir} is a mount point, which a merge cannot replace (it is built "
                        f"beside its output and renamed into place): name a folder inside it, e.g. "
                        f"{os.path.join(out_dir, 'merged')}")
    inputs = [m.path for m in plan.models] + [m.adapter.path for m in plan.models if m.adapter]
    inputs += [plan.tokenizer_model.path] + [p for p in [plan.recipe.path] if p]
    real_out = os.path.realpath(out_dir)
    for path in inputs:
        real = os.path.realpath(path)
        if real == real_out or real.startswith(real_out.rstrip(os.sep) + os.sep):
            what = "is an input" if real == real_out else f"holds {path}, an input"
            raise SemeError(f"output folder {out_dir} {what} of the merge: choose another output folder")
    if not os.path.isdir(out_dir):
        return
    with os.scandir(out_dir) as listing:
        entries = list(listing)
    if entries and not overwrite:
        raise not_empty(out_dir)
    for entry in entries:
        if not _of_a_model(entry):
            raise SemeError(f"--overwrite replaces a model folder, and {out_dir} also holds '{entry.name}': "
                            f"move it or choose another output folder")


def _of_a_model(entry: os.DirEntry) -> bool:
    """Whether `entry` is a file of a model folder, or its folder of named chat templates (only those)."""
    if entry.name == CHAT_TEMPLATES and entry.is_dir(follow_symlinks=False):
        with os.scandir(entry.path) as listing:
            return all(t.is_file(follow_symlinks=False) and t.name.endswith(".jinja") for t in listing)
    return entry.is_file(follow_symlinks=False) and (entry.name.endswith(_MODEL_FILE_SUFFIXES)
                                                     or is_tokenizer_file(entry.name))


def not_empty(out_dir: str) -> SemeError:
    """The refusal of a non-empty output folder without --overwrite."""
    return SemeError(f"output folder {out_dir} exists and is not empty (use --overwrite to replace it)")


def _prepare_staging(plan: Plan, out_dir: str, staging: str, overwrite: bool, resume: bool) -> int:
    """Check the output, create (or, without `resume`, empty) the staging folder and lock it; the
    lock's descriptor, to be closed once the merge is published or has failed."""
    _check_output(plan, out_dir, overwrite)
    existed = os.path.isdir(staging)
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as e:
        raise SemeError(f"cannot create the output folder {out_dir}: {e.strerror or e} ({e.filename or staging})") from None
    lock = _lock(staging, out_dir)
    try:
        # Again under the lock: a merge into the same output may have published (renamed its own
        # staging folder into place) since the first check, and would be replaced without --overwrite.
        _check_output(plan, out_dir, overwrite)
        if existed and not (resume or overwrite):
            raise SemeError(f"an interrupted merge into {out_dir} left {staging}: use --resume to continue it "
                            f"or --overwrite to start over")
        if not resume:
            clear(staging)
        elif os.path.exists(os.path.join(staging, STOP_FILE)):  # left by a failed run under torchrun
            os.remove(os.path.join(staging, STOP_FILE))
        # what the staging folder holds is kept or rewritten in place by a resumed merge
        free = shutil.disk_usage(os.path.dirname(out_dir)).free + _allocated(staging)
        if free < plan.output_bytes * 1.01 + 10**6:
            raise SemeError(f"not enough disk space in {os.path.dirname(out_dir)}: the merge writes "
                            f"{format_size(plan.output_bytes)}, {format_size(free)} are free")
    except BaseException:
        os.close(lock)
        if not existed:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return lock


def _lock(staging: str, out_dir: str) -> int:
    """An exclusive lock on the staging folder, held by the merge writing into it: a second merge into
    the same output (started beside it, or resuming it while it runs) is refused instead of writing
    into its shards and publishing a mix. Unguarded where the system or filesystem has no locks."""
    try:
        fd = os.open(staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:  # renamed into place by a merge publishing just now
        raise SemeError(f"another merge into {out_dir} has just finished: rerun with --overwrite to replace "
                        f"its output") from None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SemeError(f"another merge into {out_dir} is running (it holds {staging}): wait for it to finish, "
                        f"or stop it and rerun with --resume") from None
    except OSError:
        pass
    return fd


def _allocated(folder: str) -> int:
    """The bytes of disk the files of `folder` take up."""
    with os.scandir(folder) as listing:
        return sum(e.stat(follow_symlinks=False).st_blocks * 512 for e in listing if e.is_file(follow_symlinks=False))


def _plan_id(plan: Plan, shard_size: int, version: str, device: str, backend: str) -> str:
    """What a resumed merge must share with the interrupted one: recipe, inputs' files, layout, version,
    and the kind of device and the kernels (the reference backend's, or a GPU's, bytes differ in rounding
    from the fused kernels')."""
    h = hashlib.sha256()
    files = sorted({f for m in plan.models for f in m.files()})
    parts = [plan.recipe.text, version, str(shard_size), device.partition(":")[0], backend]
    parts += [f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files]
    parts += [f"{t.name}:{t.dtype}:{t.shape}" for t in plan.tasks]
    h.update("\n".join(parts).encode())
    return h.hexdigest()


def _execute(plan: Plan, folder: str, device: str, backend: str, shard_size: int, resume: bool,
             allow_nonfinite: bool, progress: bool, plan_id: str, group, max_memory: int, prefetch_bytes: int,
             direct_io: bool, stop: str | None) -> dict:
    """The streaming loop. Inputs of the next tasks are prefetched (madvise), and on a GPU staged
    (`seme.staging`), while the current one is merged, and finished tensors are checksummed and their
    shards flushed by a background thread. Stops (`_Stopped`) once the file `stop` exists."""
    engine = make_engine(plan, device, backend, group.world, allow_nonfinite)
    writer = ShardWriter(folder, [(t.name, t.dtype, t.shape, t.nbytes) for t in plan.tasks], shard_size, plan_id,
                         resume=resume, rank=group.rank, world=group.world, direct_io=direct_io,
                         notes=engine.semantic.stats if engine.semantic else None)
    if writer.busy_ranks < group.world:
        warnings.warn(f"{group.world - writer.busy_ranks} of the {group.world} ranks have nothing to merge: the "
                      f"output's {len(plan.tasks)} tensor(s) are shared in runs by bytes, and {writer.busy_ranks} "
                      f"rank(s) already merge them as fast as {group.world} would")
    tasks = [t for t in plan.tasks if not writer.skip(t.name)]
    bar = Progress(len(tasks), sum(_input_bytes(plan, t) for t in tasks), progress)
    # Inputs that do not fit in memory leave the page cache after their last use (a pass over them
    # would only evict them later, reclaiming memory in the way of the next reads: DARE-TIES on
    # 28.5 GB read from disk, 23 GB of memory, 62 -> 49 s); inputs that fit stay cached for the next merge.
    last_use = {key: i for i, t in enumerate(tasks) for key in t.inputs} if bar.total_bytes > available_memory() else {}
    prefetched = 0
    with Finisher(writer, bar) as finisher, engine.staging(tasks, prefetch_bytes, bar):
        on_host = [t for t in tasks if t.name in engine.on_host]  # too large for the GPU
        need, name = largest_need(plan, "cpu", memory_backend(backend, allow_nonfinite), on_host, native=False)
        if need > max_memory:
            raise SemeError(f"--max-memory {format_size(max_memory)} is below what '{name}' needs merged on the CPU, "
                            f"as it does not fit in the GPU's free memory: {format_size(need, up=True)}")
        for i, task in enumerate(tasks):
            if stop is not None and os.path.exists(stop):
                raise _Stopped()
            prefetched = _prefetch(plan, tasks, max(prefetched, i + 1), prefetch_bytes)
            start = time.perf_counter()
            nbytes = _input_bytes(plan, task)
            with writer.buffer(task.name) as out:
                if task.copy:
                    copy_tensor(plan, task, out)
                    finite = True
                else:
                    finite = engine.merge(task, out)
            for m, name in task.inputs:
                plan.models[m].release(name, evict=last_use.get((m, name)) == i)
            if not allow_nonfinite and not finite:
                raise SemeError(f"the merged tensor '{task.name}' contains NaN or Inf "
                                f"(pass --allow-nonfinite to write it anyway)")
            bar.stage("merge", time.perf_counter() - start, nbytes)
            finisher.put(task.name, task.nbytes)
            bar.update(nbytes)
    seconds = bar.finish()
    return {"tensors": len(plan.tasks), "input_bytes": plan.input_bytes, "output_bytes": plan.output_bytes,
            "seconds": seconds, "writer": writer, "semantic": engine.semantic}


def copy_tensor(plan: Plan, task, out: memoryview) -> None:
    """A copy task's one input, as stored or cast to the task's dtype (a trailing layer in the output's)."""
    m, name = task.inputs[0]
    if plan.models[m].tensors[name].dtype == task.dtype:
        with plan.models[m].view(name) as source:
            out[:] = source
        return
    if not len(out):
        return
    import torch

    from seme.plan import CODE_NAMES

    cast = plan.models[m].load(name).to(getattr(torch, CODE_NAMES[task.dtype]))
    torch.frombuffer(out, dtype=torch.uint8).copy_(cast.contiguous().reshape(-1).view(torch.uint8))


def memory_backend(backend: str, allow_nonfinite: bool) -> str:
    """The backend whose memory a merge plans for: with `allow_nonfinite` any tensor may be merged
    by the reference (`engine.check_inputs`), whose temporaries the kernels do not have."""
    return "reference" if allow_nonfinite else backend


def least_memory(plan: Plan, device: str, backend: str) -> tuple[int, int]:
    """What a merge holds at most in host memory: (in its loop: the largest tensor's merge, `largest_need`,
    on a GPU the staging buffers, and what SeMe keeps from its pre-pass; in SeMe's alignment
    pre-pass, before the loop)."""
    largest = largest_need(plan, device, backend)[0]
    if device != "cpu":
        from seme.staging import InputStager  # imports torch, which a GPU merge needs anyway

        largest += InputStager.host_bytes()
    if plan.semantic is None:
        return largest, 0
    return largest + memory.held_bytes(plan, device), memory.prepass_bytes(plan, device)


def largest_need(plan: Plan, device: str, backend: str, tasks=None, native: bool | None = None) -> tuple[int, str | None]:
    """The most bytes one tensor's merge (of `tasks`, by default the plan's) holds in host memory
    (its inputs, their adapted, re-mapped or cast copies, the method's temporaries, the result and two
    results waiting to be written), and that tensor. `native`: whether the merge runs on the
    NativeEngine (by default, where `make_engine` would choose it)."""
    return max(((_input_bytes(plan, t) + _working_bytes(plan, t, device, backend, native) + 3 * t.nbytes, t.name)
                for t in (plan.tasks if tasks is None else tasks)), default=(0, None))


def _input_bytes(plan: Plan, task) -> int:
    return sum(plan.models[m].tensors[n].nbytes for m, n in task.inputs)


def _working_bytes(plan: Plan, task, device: str, backend: str, native: bool | None = None) -> int:
    """What a task holds beyond its mapped inputs: an adapted input's copy and temporaries
    (LoraAdapter.working_bytes), a vocabulary re-mapping's copies of the inputs
    (seme.vocabulary.Remap.apply: one per input, with the output's rows, in the widest input dtype),
    and, on the CPU, a plain-torch merge's temporaries (Method.peak_buffers: where no fused kernel
    serves the method or the tensor's size, or the merge is in float64) and, unless the NativeEngine
    (`native`; by default, where `make_engine` would choose it) merges it in place, a TorchEngine's cast
    copies and kernel result (`torch_host_bytes`). On a GPU those are the GPU's memory."""
    if task.copy:  # cast where the output's dtype is not the input's (copy_tensor)
        m, n = task.inputs[0]
        return task.nbytes if plan.models[m].tensors[n].dtype != task.dtype else 0
    held = 0
    for m, n in task.inputs:
        if plan.models[m].adapted(n):
            held += plan.models[m].adapter.working_bytes(n, plan.models[m].tensors[n])
    held += remapped_bytes(plan, task)
    if device != "cpu":
        return held
    method = plan.recipe.merge_method
    fused = backend != "reference" and fused_merge.available() and (method == "seme"
                                                                    or fused_merge.covers(method, task.params, task.shape))
    if task.derived:  # SeMe's derived inputs, merge and drift report
        return held + memory.task_bytes(plan, task, fused, DTYPE_SIZES[task.dtype])
    held += reference_bytes(plan, task, fused)
    if native is None:
        native = native_serves(plan, device, backend, distributed.world_size())
    return held if native and native_takes(plan, task) else held + torch_host_bytes(plan, task, fused)


def available_memory() -> float:
    """Bytes of memory available for the page cache and new allocations (Linux's MemAvailable);
    infinite where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return math.inf


def _prefetch(plan: Plan, tasks, start: int, budget: int) -> int:
    """Ask the OS to read ahead the inputs of tasks[start:] up to `budget` bytes; the next start."""
    end, total = start, 0
    while end < len(tasks) and (end == start or total < budget):
        for m, name in tasks[end].inputs:
            plan.models[m].prefetch(name)
            total += plan.models[m].tensors[name].nbytes
        end += 1
    return end


class Finisher:
    """Hands merged tensors to the shard writer on a background thread (checksumming, pwrite and a
    finished shard's fsync release the GIL), so that the next merge need not wait for them. At most
    one tensor waits while another is written: with the one merging, the three results that
    --max-memory counts. An error there surfaces on the next put."""

    def __init__(self, writer: ShardWriter, progress: Progress):
        self.writer, self.progress = writer, progress
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                start = time.perf_counter()
                try:
                    self.writer.written(item[0])
                except BaseException as e:  # re-raised in the merging thread
                    self.error = e
                self.progress.stage("write", time.perf_counter() - start, item[1])

    def put(self, name: str, nbytes: int) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, nbytes))

    def __exit__(self, *exc) -> None:
        self.queue.put(None)
        self.thread.join()
        self.writer.close()
        if self.error is not None and exc[0] is None:
            raise self.error
