"""Inputs on their way to a GPU while the tensor before them merges, and results on their way back.

From pageable memory (the mapped inputs) a copy to a GPU is synchronous and takes the page faults
on the way, so a plain GPU merge reads, copies, merges and writes one after the other. Here reader
threads copy the inputs of the next tasks, chunk by chunk, into pinned buffers from a small pool
(pinning memory is slow, so buffers are reused) and send each chunk to the device on a copy stream;
the merge's stream waits for a task's chunks by their events. Tasks are staged in order, and the
bytes staged ahead of the task being merged stay within a budget (the executor's read-ahead share
of --max-memory); the task the merge waits for is staged whatever its size. Off CUDA the same
machinery runs with plain buffers and copies: that is how the tests drive it on a CPU.
"""
from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch


class InputStager:
    """Stages the inputs of `tasks` on `device`, reading ahead from the first `get`, which hands them
    out in the same order. `sources(task)` lists a task's host tensors, None for an input not to
    stage (SeMe's derived inputs); `on_read(seconds, nbytes)` receives the readers' time and bytes.
    Beyond the budget, it holds `host_bytes()`."""

    readers = 4  # threads copying from the page cache: one falls well short of its bandwidth
    chunk = 16 << 20  # bytes per buffer: copies this large run at full speed and still pipeline

    @classmethod
    def host_bytes(cls) -> int:
        """The host memory its buffers take at most (pinned on a GPU), beyond the budget: two per
        reader, two for the results (`seme.executor.least_memory` counts it)."""
        return (2 * cls.readers + 2) * cls.chunk

    def __init__(self, device: torch.device, tasks, sources, budget: int, on_read):
        self.device, self.sources, self.budget, self.on_read = device, sources, budget, on_read
        self.pin = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.pin else None
        self.pending = deque(tasks)  # tasks not staged yet
        self.staged: deque = deque()  # (task, device tensors, futures of their chunks, bytes), in order
        self.ahead = 0  # bytes staged for the tasks after the one being merged
        # Two buffers per reader, so that one fills while another's copy to the device runs. An entry
        # is (buffer, event of its last copy to the device); buffers are pinned on first use.
        self._buffers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(2 * self.readers):
            self._buffers.put((None, None))
        self._out = [None, None]  # the results' two buffers
        self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="seme-stage", initializer=self._bind)
        self._lock = threading.Lock()
        self._active, self._since = 0, 0.0  # readers copying now, and since when that count holds

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, task) -> list:
        """`task`'s inputs on the device (None where `sources` gave None), ready for the current
        stream. A reader's exception is raised here."""
        if not self.staged:
            self._admit(wanted=task)
        if not self.staged or self.staged[0][0] is not task:
            raise RuntimeError("inputs requested out of their staging order")
        _, tensors, futures, nbytes = self.staged.popleft()
        self.ahead -= nbytes
        self._admit()
        stream = torch.cuda.current_stream(self.device) if self.stream is not None else None
        for future in futures:
            done = future.result()
            if stream is not None:
                stream.wait_event(done)
        if stream is not None:
            for t in tensors:
                if t is not None:
                    t.record_stream(stream)  # its memory is not reused before the merge's kernels ran
        return tensors

    def put(self, result: torch.Tensor, out: memoryview) -> None:
        """Copy `result` into `out` (host memory) through two buffers: while one is copied into `out`,
        the device fills the other."""
        stream = torch.cuda.current_stream(self.device) if self.stream is not None else None
        src = result.contiguous().reshape(-1).view(torch.uint8)
        dst = torch.frombuffer(out, dtype=torch.uint8)
        waiting = None
        for i, a in enumerate(range(0, dst.numel(), self.chunk)):
            if self._out[i % 2] is None:
                self._out[i % 2] = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.pin)
            host = self._out[i % 2][:min(self.chunk, dst.numel() - a)]
            host.copy_(src[a:a + host.numel()], non_blocking=True)
            done = _record(stream)
            if waiting is not None:
                _drain(*waiting)
            waiting = (host, done, dst[a:a + host.numel()])
        if waiting is not None:
            _drain(*waiting)

    def close(self) -> None:
        """Stop: queued chunks are dropped and running ones end (each is one chunk's copy), so a merge
        that failed midway does not wait for the reads ahead of it."""
        self.pending.clear()
        self.staged.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _admit(self, wanted=None) -> None:
        """Stage tasks in order while the bytes ahead fit the budget; `wanted`, the next to merge, in
        any case."""
        while self.pending:
            sources = self.sources(self.pending[0])
            nbytes = sum(s.nbytes for s in sources if s is not None)
            if self.pending[0] is not wanted and self.ahead + nbytes > self.budget:
                return
            tensors, futures = [], []
            for s in sources:
                if s is None:
                    tensors.append(None)
                    continue
                with torch.cuda.stream(self.stream):  # the copy stream owns it until `get` hands it out
                    t = torch.empty(s.shape, dtype=s.dtype, device=self.device)
                src, dst = _bytes(s), _bytes(t)
                futures += [self._pool.submit(self._read, src[a:a + self.chunk], dst[a:a + self.chunk])
                            for a in range(0, src.numel(), self.chunk)]
                tensors.append(t)
            self.staged.append((self.pending.popleft(), tensors, futures, nbytes))
            self.ahead += nbytes

    def _bind(self) -> None:
        """Threads start on GPU 0: on the merge's GPU instead, they make no CUDA context on another."""
        if self.stream is not None:
            torch.cuda.set_device(self.stream.device)

    def _read(self, source: torch.Tensor, target: torch.Tensor):
        """Copy `source` (host bytes) to `target` (device bytes) through a buffer; the event of the
        copy to the device (None off CUDA, where it is done on return)."""
        buffer, done = self._buffers.get()
        try:
            if buffer is None:
                buffer = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.pin)
            if done is not None:
                done.synchronize()  # the buffer's previous copy to the device has finished
            host = buffer[:source.numel()]
            self._reading(+1)
            # memmove, not copy_: the readers are the parallelism, and torch's copy_ would start a
            # team of threads in each of them
            ctypes.memmove(host.data_ptr(), source.data_ptr(), source.numel())
            self._reading(-1, source.numel())
            with torch.cuda.stream(self.stream):
                target.copy_(host, non_blocking=True)
            done = _record(self.stream)
            return done
        finally:
            self._buffers.put((buffer, done))

    def _reading(self, change: int, nbytes: int = 0) -> None:
        """The read stage's time is the time in which some reader copies (the readers overlap: the sum
        of their times would understate the rate)."""
        with self._lock:
            now = time.perf_counter()
            self.on_read(now - self._since if self._active else 0.0, nbytes)
            self._active += change
            self._since = now


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _record(stream):
    """An event after the work queued so far on `stream`; None without a stream (the work is done)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _drain(host: torch.Tensor, done, target: torch.Tensor) -> None:
    if done is not None:
        done.synchronize()
    target.copy_(host)
