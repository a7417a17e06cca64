"""Output writing: safetensors shards laid out from the plan, streamed tensor by tensor, and a
manifest of finished pieces of shards that lets an interrupted merge resume."""
from __future__ import annotations

import errno
import glob
import json
import mmap
import os
import shutil
import threading
import zlib
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows: no torchrun merges over a shared filesystem
    fcntl = None

from seme.distributed import split
from seme.io.safetensors_file import layout_header

SHARD_METADATA = {"format": "pt"}
# Alignment of direct writes (memory, file offset, length): a multiple of the device's block, and
# whole pages, so that no page holds both directly written bytes and bytes another rank writes
# through the page cache at the same time (the kernel could then keep a stale copy of the page).
DIRECT_BLOCK = max(4096, mmap.PAGESIZE)
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


def range_checksum(path: str, start: int, end: int) -> str:
    """The checksum of bytes [start, end) of a file (of fewer where the file is shorter)."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            block = f.read(min(1 << 22, end - start))
            if not block:
                break
            crc, start = crc32(block, crc), start + len(block)
    return _checksum(crc)


def _checksum(crc: int) -> str:
    return f"crc32:{crc:08x}"


class _Piece(NamedTuple):
    """The bytes [start, end) of a shard that one rank writes: the header (b"" past the first
    piece) and its tensors, in file order; file_size, the whole shard's."""
    header: bytes
    start: int
    end: int
    file_size: int
    names: list[str]


class ShardWriter:
    """Writes planned tensors (name, dtype code, shape, nbytes) into shards of at most `shard_size` bytes.

    Shard boundaries and every tensor's offset are fixed up front, so no shard is ever buffered in
    memory: each shard's blocks are reserved, `buffer(name)` hands out a staging buffer for the
    merge to write the tensor into, and `written(name)` checksums it and writes it to its place
    with pwrite. Under torchrun each rank writes a contiguous run of the plan's tensors, balanced
    by bytes (`seme.distributed.split`), so a shard may be written by several ranks, each its own
    piece of it: disjoint byte ranges, the header with the first tensors. When a piece's last
    tensor is written, it is flushed and recorded, with its range and CRC-32, in the rank's
    manifest (one process: one piece per shard, the whole shard); with `resume`, pieces that
    manifests of the same plan vouch for (checksums still matching) are kept, and `skip()` tells
    which tensors need no merging here (kept, or another rank's).

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
        owner = dict(zip((e[0] for e in planned), split([e[3] for e in planned], world)))
        self.busy_ranks = max(1, len(set(owner.values())))  # rank 0 writes a plan of no tensors
        # shard -> the blocks at the ends of this rank's piece that another rank's piece shares
        self._shared_blocks: dict[str, set[int]] = {}
        self._pieces: dict[str, _Piece] = {}  # this rank's piece of each shard it writes in
        self._where: dict[str, tuple[int, int]] = {}  # tensor -> (offset, nbytes) in its shard
        for file, entries in zip(self.files, shards):
            header, offsets = layout_header([(name, dtype, shape) for name, dtype, shape, _ in entries], SHARD_METADATA)
            file_size = len(header) + sum(e[3] for e in entries)
            mine = [e for e in entries if owner[e[0]] == rank]
            if mine:
                first, (last, *_, nbytes) = offsets[mine[0][0]], mine[-1]
                start, end = 0 if first == len(header) else first, offsets[last] + nbytes
            elif entries or rank != 0:
                continue
            else:  # a shard of no tensors: rank 0 writes its header
                start, end = 0, file_size
            self._pieces[file] = _Piece(header if start == 0 else b"", start, end, file_size, [e[0] for e in mine])
            self._shared_blocks[file] = {at // DIRECT_BLOCK for at in (start, end) if 0 < at < file_size and at % DIRECT_BLOCK}
            for name, _, _, nbytes in mine:
                self._where[name] = (offsets[name], nbytes)
        manifests = self._manifests_of_this_plan() if resume else {}  # path -> manifest, read once
        # file -> (start, end, checksum) of this rank's finished piece of it
        self.finished: dict[str, tuple[int, int, str]] = self._verified_pieces(manifests.values())
        # What the merge notes of each tensor (SeMe's statistics), filled as tensors merge and saved
        # in the manifest with their finished piece, where a resumed merge and rank 0 under torchrun
        # find the notes of tensors that an earlier run or another rank merged (`all_notes`).
        self.notes = {} if notes is None else notes
        self.notes.update(_recorded_notes(manifests.values()))
        # What this rank's manifest recorded before (a resumed merge's, maybe of another number of
        # ranks): carried into every save, so that a rank that reads the manifests after this one
        # rewrote it still finds those pieces and their notes.
        self._earlier = manifests.get(os.path.join(folder, MANIFEST.format(rank=rank)), {"pieces": [], "notes": {}})
        self._pending: dict[str, list[str]] = {}  # shard -> this rank's tensors still to write, in file order
        # shard -> running CRC-32 of the piece while tensors arrive in file order. A CRC, not a
        # cryptographic hash: it guards against damage, not tampering, and SHA-256 took 13% of a
        # 2-core merge's CPU.
        self._crcs: dict[str, int | None] = {}
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int] = {}  # shard -> its O_DIRECT descriptor, where the filesystem gave one
        self._staged: dict[str, mmap.mmap] = {}  # tensor -> its staging buffer, until written
        self._buffers = _Buffers(max((e[3] for e in planned), default=0) + DIRECT_BLOCK)
        for file, (header, start, end, file_size, names) in self._pieces.items():
            if file in self.finished:
                continue
            # Not truncated: other ranks may be writing, or have kept, their pieces of this shard.
            # Every byte of it is some rank's, so nothing of an earlier run's file survives unwritten.
            fd = os.open(os.path.join(folder, file), os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[file] = fd
            if direct_io and hasattr(os, "O_DIRECT"):  # Linux; macOS and Windows write buffered
                try:
                    self._direct_fds[file] = os.open(os.path.join(folder, file), os.O_WRONLY | os.O_DIRECT)
                except OSError:
                    pass
            _allocate(fd, file_size, start, end)
            self._buffered(file, memoryview(header), 0)
            self._pending[file] = list(names)
            self._crcs[file] = crc32(header)
            if not names:  # a plan of no tensors: the header alone
                self._finish(file)
                self._save_manifest()

    def _manifests_of_this_plan(self) -> dict[str, dict]:
        """The manifests in the folder (from any rank) written for this plan, by path."""
        found = {}
        for path in self._manifests():
            try:
                with open(path, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("plan") == self.plan_id:
                found[path] = manifest
        return found

    def _verified_pieces(self, manifests) -> dict[str, tuple[int, int, str]]:
        """This rank's pieces that `manifests` (of this plan, from any rank, any number of ranks) record,
        the recorded bytes still matching their checksums: each piece within one run of such ranges."""
        recorded: dict[str, set[tuple[int, int, str]]] = {}
        for manifest in manifests:
            for file, start, end, checksum in manifest.get("pieces", []):
                recorded.setdefault(file, set()).add((start, end, checksum))
        kept = {}
        for file, piece in self._pieces.items():
            start, end, path = piece.start, piece.end, os.path.join(self.folder, file)
            ranges = sorted(r for r in recorded.get(file, ()) if r[0] < end and r[1] > start)
            if not ranges or not os.path.isfile(path):
                continue
            covered, verified = start, {}
            for s, e, checksum in ranges:  # adjacent verified ranges that cover [start, end)
                if s <= covered < e and range_checksum(path, s, e) == checksum:
                    covered, verified[s, e] = e, checksum
            if covered >= end:  # the same piece as recorded (the same number of ranks), or a part of some
                kept[file] = (start, end, verified.get((start, end)) or range_checksum(path, start, end))
        return kept

    def all_notes(self) -> dict[str, dict]:
        """The notes of every tensor, whichever rank or run merged it, in the plan's order (once every
        rank has finished its pieces)."""
        notes = _recorded_notes(self._manifests_of_this_plan().values())
        return {name: notes[name] for name in self.weight_map if name in notes}

    def _save_manifest(self) -> None:
        path = os.path.join(self.folder, MANIFEST.format(rank=self.rank))
        # by the plan's names: the merging thread adds notes while this one saves
        notes = {name: self.notes[name] for file in self.finished for name in self._pieces[file].names
                 if name in self.notes}
        pieces = self._earlier["pieces"] + [[file, *piece] for file, piece in self.finished.items()]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"plan": self.plan_id, "pieces": pieces, "notes": {**self._earlier["notes"], **notes}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def skip(self, name: str) -> bool:
        """Whether this rank has nothing to do for `name`: another rank's tensor, or one kept from an
        interrupted run."""
        return name not in self._where or self.weight_map[name] in self.finished

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
        direct = self._direct_fds.get(file)
        first = -offset % DIRECT_BLOCK  # data[first:last] are the tensor's whole blocks
        last = max(first, (offset + len(data)) // DIRECT_BLOCK * DIRECT_BLOCK - offset)
        if direct is None or last == first:
            self._buffered(file, data, offset)
            return
        self._buffered(file, data[:first], offset)
        try:
            _pwrite_all(direct, data[first:last], offset + first)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            os.close(self._direct_fds.pop(file))  # opened, but the filesystem takes no direct writes
            _pwrite_all(self._fds[file], data[first:last], offset + first)
        self._buffered(file, data[last:], offset + last)

    def _buffered(self, file: str, data: memoryview, offset: int) -> None:
        """data to `offset` of the shard through the page cache. Bytes in a block that another rank's
        piece shares are written under a POSIX lock of the block: a network filesystem's client
        (NFS) may otherwise write back the whole cached page, over the other rank's bytes, where
        under a lock it writes only these, and before the lock is released."""
        fd = self._fds[file]
        blocks = range(offset // DIRECT_BLOCK, -(-(offset + len(data)) // DIRECT_BLOCK))
        shared = [b for b in self._shared_blocks[file] if b in blocks]
        if not data or not shared or fcntl is None:
            _pwrite_all(fd, data, offset)
            return
        start = min(shared) * DIRECT_BLOCK
        length = (max(shared) + 1) * DIRECT_BLOCK - start
        fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
        try:
            _pwrite_all(fd, data, offset)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, length, start)

    def _finish(self, file: str) -> None:
        if file in self._direct_fds:
            os.close(self._direct_fds.pop(file))
        fd = self._fds.pop(file)
        os.fsync(fd)
        os.close(fd)
        running = self._crcs.pop(file)
        start, end = self._pieces[file].start, self._pieces[file].end
        self.finished[file] = (start, end, _checksum(running) if running is not None
                               else range_checksum(os.path.join(self.folder, file), start, end))

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


def _recorded_notes(manifests) -> dict[str, dict]:
    """The notes that `manifests` record (of tensors in the pieces they record)."""
    notes = {}
    for manifest in manifests:
        notes.update(manifest.get("notes", {}))
    return notes


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


def _allocate(fd: int, size: int, start: int, end: int) -> None:
    """Size the shard (every rank writing in it sizes it alike) and reserve the blocks of this rank's
    piece [start, end) up front: a full disk fails here rather than mid-merge, and writes into
    allocated blocks run about twice as fast as into a sparse file. Where the filesystem cannot
    allocate ahead, the piece stays sparse until written."""
    os.ftruncate(fd, size)
    if not hasattr(os, "posix_fallocate") or end == start:  # macOS, Windows
        return
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


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
