"""Output writing: safetensors shards laid out from the plan, streamed tensor by tensor, and a
manifest of finished shards that lets an interrupted merge resume."""
from __future__ import annotations

import errno
import glob
import json
import mmap
import os
import shutil
import threading
import zlib

from seme.distributed import assign
from seme.io.safetensors_file import layout_header

SHARD_METADATA = {"format": "pt"}
DIRECT_BLOCK = 4096  # alignment of direct writes (memory, file offset, length): a multiple of the device's block
MANIFEST = "seme-manifest.{rank}.json"  # one per rank: ranks never write the same file


def _crc32_function():
    """zlib.crc32's function, from seme._C where it runs with carry-less multiplies (2.3x zlib's
    rate here: the checksums were most of the writer thread's CPU)."""
    try:
        from seme import _C
    except ImportError:
        return zlib.crc32
    return _C.crc32 if _C.crc32_accelerated() else zlib.crc32


crc32 = _crc32_function()


def file_checksum(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = crc32(block, crc)
    return _checksum(crc)


def _checksum(crc: int) -> str:
    return f"crc32:{crc:08x}"


class ShardWriter:
    """Writes planned tensors (name, dtype code, shape, nbytes) into shards of at most `shard_size` bytes.

    Shard boundaries and every tensor's offset are fixed up front, so no shard is ever buffered in
    memory: each shard's blocks are reserved, `buffer(name)` hands out a staging buffer for the
    merge to write the tensor into, and `written(name)` checksums it and writes it to its place
    with pwrite. When a shard's last tensor is written, the shard is flushed and recorded, with its
    CRC-32, in the manifest; with `resume`, shards the manifest vouches for (same plan, same
    checksum) are kept, and `skip()` tells which tensors need no merging here (kept, or another
    rank's).

    Staging, not a writable mapping of the shard: a mapped page that the merge writes is first read
    in, and the kernel zero-fills reserved blocks on every such read (with readahead, again after
    reclaim). pwrite of whole pages reads nothing. Side by side on bench.e2e's models (2 cores), the
    merge loop took 1.17 -> 0.96 s for DARE-TIES, 0.74 -> 0.56 s for linear. At most three
    buffers exist (`_Buffers`), reused.

    With `direct_io`, the whole blocks of each tensor go to the disk with O_DIRECT from the staging
    buffer (which places the tensor at its file offset's place in a block), and only the partial
    blocks at its ends, shared with its neighbours, and the header through the page cache. A
    buffered write copies the output into page-cache pages the system must first find: on the
    2-core VM that runs CI those allocations alternated between fast and up to 5x slower phases,
    and DARE-TIES merges of bench.e2e's models took 0.69-1.62 s buffered against 0.64-0.69 s
    direct (six runs each, alternating). Where the filesystem refuses O_DIRECT (tmpfs, some
    network filesystems), at open or at the first write, the shard is written buffered.
    """

    def __init__(self, folder: str, planned: list[tuple[str, str, tuple[int, ...], int]], shard_size: int,
                 plan_id: str, resume: bool = False, rank: int = 0, world: int = 1, direct_io: bool = True,
                 notes: dict[str, dict] | None = None):
        shards, current, size = [], [], 0
        for entry in planned:
            if current and size + entry[3] > shard_size:
                shards.append(current)
                current, size = [], 0
            current.append(entry)
            size += entry[3]
        if current or not shards:
            shards.append(current)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.folder, self.plan_id, self.rank = folder, plan_id, rank
        self.total_size = sum(e[3] for e in planned)
        self.weight_map = {name: file for file, entries in zip(self.files, shards) for name, *_ in entries}
        owner = assign([sum(e[3] for e in entries) for entries in shards], world)
        self.owned = {file for file, r in zip(self.files, owner) if r == rank}
        self.finished: dict[str, str] = self._verified_shards() if resume else {}
        # What the merge notes of each tensor (SeMe's statistics), filled as tensors merge and saved
        # in the manifest with their finished shard, where a resumed merge and rank 0 under torchrun
        # find the notes of tensors that an earlier run or another rank merged (`all_notes`).
        self.notes = {} if notes is None else notes
        if resume:
            self.notes.update(self._recorded_notes())
        self._where: dict[str, tuple[int, int]] = {}  # tensor -> (offset, nbytes) in its shard
        self._pending: dict[str, list[str]] = {}  # shard -> tensors still to write, in file order
        # shard -> running CRC-32 while tensors arrive in file order. A CRC, not a cryptographic hash:
        # it guards against damage, not tampering, and SHA-256 took 13% of a 2-core merge's CPU.
        self._crcs: dict[str, int | None] = {}
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int] = {}  # shard -> its O_DIRECT descriptor, where the filesystem gave one
        self._staged: dict[str, mmap.mmap] = {}  # tensor -> its staging buffer, until written
        self._buffers = _Buffers(max((e[3] for e in planned), default=0) + DIRECT_BLOCK)
        for file, entries in zip(self.files, shards):
            if file in self.finished or file not in self.owned:
                continue
            header, offsets = layout_header([(name, dtype, shape) for name, dtype, shape, _ in entries], SHARD_METADATA)
            fd = os.open(os.path.join(folder, file), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[file] = fd
            if direct_io and hasattr(os, "O_DIRECT"):  # Linux; macOS and Windows write buffered
                try:
                    self._direct_fds[file] = os.open(os.path.join(folder, file), os.O_WRONLY | os.O_DIRECT)
                except OSError:
                    pass
            os.pwrite(fd, header, 0)
            _allocate(fd, len(header) + sum(e[3] for e in entries))
            self._pending[file] = [name for name, *_ in entries]
            self._crcs[file] = crc32(header)
            for name, _, _, nbytes in entries:
                self._where[name] = (offsets[name], nbytes)
            if not entries:
                self._finish(file)
        self._save_manifest()

    def _manifests_of_this_plan(self) -> list[dict]:
        """The manifests in the folder (from any rank) written for this plan."""
        found = []
        for path in self._manifests():
            try:
                with open(path, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("plan") == self.plan_id:
                found.append(manifest)
        return found

    def _verified_shards(self) -> dict[str, str]:
        """Owned shards that a manifest of this plan (from any rank) records with a matching checksum."""
        recorded = {}
        for manifest in self._manifests_of_this_plan():
            recorded.update(manifest.get("shards", {}))
        return {file: checksum for file, checksum in recorded.items()
                if file in self.owned and os.path.isfile(os.path.join(self.folder, file))
                and file_checksum(os.path.join(self.folder, file)) == checksum}

    def _recorded_notes(self) -> dict[str, dict]:
        """The notes that the manifests of this plan record (of tensors in the shards they record)."""
        notes = {}
        for manifest in self._manifests_of_this_plan():
            notes.update(manifest.get("notes", {}))
        return notes

    def all_notes(self) -> dict[str, dict]:
        """The notes of every tensor, whichever rank or run merged it, in the plan's order (once every
        rank has finished its shards)."""
        notes = self._recorded_notes()
        return {name: notes[name] for name in self.weight_map if name in notes}

    def _save_manifest(self) -> None:
        path = os.path.join(self.folder, MANIFEST.format(rank=self.rank))
        # by the plan's names: the merging thread adds notes while this one saves
        notes = {name: self.notes[name] for name, file in self.weight_map.items()
                 if file in self.finished and name in self.notes}
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"plan": self.plan_id, "shards": self.finished, "notes": notes}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def skip(self, name: str) -> bool:
        """Whether this rank has nothing to do for `name`: another rank's shard, or one kept from an
        interrupted run."""
        file = self.weight_map[name]
        return file in self.finished or file not in self.owned

    def buffer(self, name: str) -> memoryview:
        """A buffer for the bytes of `name`, to be filled once and then handed to `written`."""
        if name not in self._staged:
            self._staged[name] = self._buffers.take()
        return _placed(self._staged[name], *self._where[name])

    def written(self, name: str) -> None:
        """`name`'s bytes are in its buffer: checksum them (while tensors arrive in file order),
        write them to the shard, and finish the shard after its last tensor."""
        offset, nbytes = self._where.pop(name)
        file = self.weight_map[name]
        staged = self._staged.pop(name)
        with _placed(staged, offset, nbytes) as data:
            pending = self._pending[file]
            if self._crcs.get(file) is not None and pending[0] == name:
                self._crcs[file] = crc32(data, self._crcs[file])
            else:
                self._crcs[file] = None  # out of order: the checksum is read back when the shard is done
            pending.remove(name)
            self._write(file, data, offset)
        self._buffers.give(staged)
        if not pending:
            self._finish(file)
            self._save_manifest()

    def _write(self, file: str, data: memoryview, offset: int) -> None:
        """data (placed as buffer() places it) to `offset` of the shard: its whole blocks direct where
        the shard has a direct descriptor, the rest buffered."""
        fd, direct = self._fds[file], self._direct_fds.get(file)
        first = -offset % DIRECT_BLOCK  # data[first:last] are the tensor's whole blocks
        last = max(first, (offset + len(data)) // DIRECT_BLOCK * DIRECT_BLOCK - offset)
        if direct is None or last == first:
            _pwrite_all(fd, data, offset)
            return
        _pwrite_all(fd, data[:first], offset)
        try:
            _pwrite_all(direct, data[first:last], offset + first)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            os.close(self._direct_fds.pop(file))  # opened, but the filesystem takes no direct writes
            _pwrite_all(fd, data[first:last], offset + first)
        _pwrite_all(fd, data[last:], offset + last)

    def _finish(self, file: str) -> None:
        if file in self._direct_fds:
            os.close(self._direct_fds.pop(file))
        fd = self._fds.pop(file)
        os.fsync(fd)
        os.close(fd)
        running = self._crcs.pop(file)
        self.finished[file] = (_checksum(running) if running is not None
                               else file_checksum(os.path.join(self.folder, file)))

    def close(self) -> None:
        """Close shards left open (after an error), without marking them finished."""
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            os.close(fd)
        self._fds, self._direct_fds = {}, {}

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    def _manifests(self) -> list[str]:
        return glob.glob(os.path.join(self.folder, MANIFEST.format(rank="*")))

    def remove_others(self) -> None:
        """Remove what the folder holds beyond this plan's shards and the manifests: a resumed merge's
        folder can hold the shards of an earlier plan (another --out-shard-size; a plan that changed
        is merged anew) or the metadata written before it was interrupted."""
        clear(self.folder, keep=set(self.files) | {os.path.basename(p) for p in self._manifests()})

    def remove_manifests(self) -> None:
        for path in self._manifests():
            os.remove(path)


def clear(folder: str, keep: set[str] = frozenset()) -> None:
    """Remove the files and subfolders of `folder`, bar those named in `keep`."""
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)


def _placed(buffer: mmap.mmap, offset: int, nbytes: int) -> memoryview:
    """The bytes of a tensor at file `offset` in its staging buffer, placed so that the file's blocks
    fall on the buffer's (page-aligned) blocks: whole blocks can be written direct from it."""
    start = offset % DIRECT_BLOCK
    return memoryview(buffer)[start:start + nbytes]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _allocate(fd: int, size: int) -> None:
    """Reserve the shard's blocks up front: a full disk fails here rather than mid-merge, and writes
    into allocated blocks run about twice as fast as into a sparse file. Where the filesystem cannot
    allocate ahead, the file is only sized (sparse)."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        os.ftruncate(fd, size)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class _Buffers:
    """Staging buffers, reused, each as large as the largest planned tensor: no more exist than
    tensors in flight (one merging, one waiting and one being written, `seme.executor.Finisher`),
    the three results that --max-memory counts.

    A buffer is an anonymous private mapping: its pages are zero-filled by the system as the merge
    first writes them, on the merge's threads, and a page once written stays for the next tensor.
    Bytearrays sized per tensor were cleared by a memset on the merging thread and replaced when a
    larger tensor came (bench.e2e, DARE-TIES: 60 ms of a 0.9 s merge loop, 143 MB allocated).
    """

    def __init__(self, size: int):
        self.size = size
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()  # taken on the merging thread, given back on the finishing one

    def take(self) -> mmap.mmap:
        with self.lock:
            if self.free:
                return self.free.pop()
        return _anonymous(self.size)

    def give(self, buffer: mmap.mmap) -> None:
        with self.lock:
            self.free.append(buffer)


def _anonymous(nbytes: int) -> mmap.mmap:
    """`nbytes` of zero-filled memory that take no room until written."""
    flags = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    return mmap.mmap(-1, max(nbytes, 1), **flags)  # Python's default there, a shared mapping, is shmem
