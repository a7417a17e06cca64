"""Safetensors files: validated headers, memory-mapped lazy reads, and a pre-laid-out writer.

Headers are parsed and checked by hand (cheap: no tensor is touched) so that shapes can be
validated before a merge starts. Tensors are read as zero-copy views of a memory map. The writer
knows every output tensor's shape and dtype up front (from the plan), so it writes each shard's
header first and then streams tensors straight to their offsets: memory holds one tensor at a time.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

from seme.errors import SemeError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
               "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    path: str
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, __metadata__)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SemeError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise SemeError(f"{path}: corrupt safetensors header (declares {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise SemeError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's stack
        raise SemeError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise SemeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SemeError(f"{path}: tensor '{name}' has a malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise SemeError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(lo, int) and isinstance(hi, int)):
            raise SemeError(f"{path}: tensor '{name}' has a malformed shape or offsets")
        count = 1
        for d in shape:
            count *= d
        if not 0 <= lo <= hi or hi - lo != count * DTYPE_SIZES[dtype]:
            raise SemeError(f"{path}: tensor '{name}' offsets [{lo}, {hi}] do not match shape {list(shape)} x {dtype}")
        if data_start + hi > size:
            raise SemeError(f"{path}: tensor '{name}' lies beyond the end of the file (truncated?)")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + lo, data_start + hi)
        spans.append((lo, hi, name))
    spans.sort()
    for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
        if lo1 < hi0 and hi1 > lo1:
            raise SemeError(f"{path}: tensors '{a}' and '{b}' overlap")
    return tensors, metadata


class MappedFile:
    """A read-only memory map of one safetensors file, handing out zero-copy tensor views (torch
    tensors, or raw addresses and bytes for the torch-free engine)."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            # ACCESS_COPY: a private mapping torch may treat as writable; pages are never copied
            # because nothing writes to them.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._address: int | None = None

    def address(self, info: TensorInfo) -> int:
        """Where the tensor's data lies in this process's memory (valid while the file is mapped)."""
        if self._address is None:
            import ctypes

            anchor = ctypes.c_char.from_buffer(self._map)
            self._address = ctypes.addressof(anchor)
            del anchor  # releases the buffer export; the mapping (and the address) stays
        return self._address + info.start

    def view(self, info: TensorInfo) -> memoryview:
        """The tensor's bytes, zero-copy."""
        return memoryview(self._map)[info.start:info.end]

    def release(self, info: TensorInfo, evict: bool = False) -> None:
        """Unmap the pages that lie wholly inside the tensor once it has been used: the data stays in
        the page cache, but no longer counts in this process's resident memory. With `evict` it
        leaves the page cache too: where the inputs do not fit in memory, pages read once would only
        be reclaimed later, in the way of the reads that take their place."""
        start = -(-info.start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = info.end - info.end % mmap.PAGESIZE
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        if evict and end > start and hasattr(os, "posix_fadvise"):
            fd = os.open(info.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def tensor(self, info: TensorInfo):
        import torch

        dtype = getattr(torch, {v: k for k, v in TORCH_NAMES.items()}[info.dtype])
        count = info.nbytes // DTYPE_SIZES[info.dtype]
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=info.start)
        return flat.view(info.shape)


    def prefetch(self, info: TensorInfo) -> None:
        if info.nbytes and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            start = info.start - info.start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_WILLNEED, start, info.end - start)


def layout_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a shard holding `entries` (name, dtype code, shape), and each tensor's offset."""
    header, offsets, cursor = {}, {}, 0
    for name, dtype, shape in entries:
        count = 1
        for d in shape:
            count *= d
        nbytes = count * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        offsets[name] = cursor
        cursor += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align tensor data to 8 bytes
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + v for k, v in offsets.items()}
