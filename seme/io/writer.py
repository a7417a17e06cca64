"""Output writing: safetensors shards laid out from the plan, streamed tensor by tensor, and a
manifest of finished shards that lets an interrupted merge resume."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import mmap
import os
import zlib

from seme.distributed import assign
from seme.io.safetensors_file import layout_header, unmap_pages

SHARD_METADATA = {"format": "pt"}
MANIFEST = "seme-manifest.{rank}.json"  # one per rank: ranks never write the same file


def file_checksum(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return _checksum(crc)


def _checksum(crc: int) -> str:
    return f"crc32:{crc:08x}"


class ShardWriter:
    """Writes planned tensors (name, dtype code, shape, nbytes) into shards of at most `shard_size` bytes.

    Shard boundaries and every tensor's offset are fixed up front, so no shard is ever buffered in
    memory: each shard's blocks are reserved and the file is mapped, `buffer(name)` hands out the
    tensor's place in it for the merge to write into directly (no copy, no staging buffer), and
    `written(name)` checksums those bytes and unmaps them. When a shard's last tensor is written,
    the shard is flushed and recorded, with its CRC-32, in the manifest; with `resume`, shards the
    manifest vouches for (same plan, same checksum) are kept, and `skip()` tells which tensors need no
    merging here (kept, or another rank's). Where the filesystem cannot reserve blocks, a full disk
    would surface as SIGBUS in a mapped write: there a tensor is staged in memory and written with
    pwrite instead.
    """

    def __init__(self, folder: str, planned: list[tuple[str, str, tuple[int, ...], int]], shard_size: int,
                 plan_id: str, resume: bool = False, rank: int = 0, world: int = 1):
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
        self._where: dict[str, tuple[int, int]] = {}  # tensor -> (offset, nbytes) in its shard
        self._pending: dict[str, list[str]] = {}  # shard -> tensors still to write, in file order
        # shard -> running CRC-32 while tensors arrive in file order. A CRC, not a cryptographic hash:
        # it guards against damage, not tampering, and SHA-256 took 13% of a 2-core merge's CPU.
        self._crcs: dict[str, int | None] = {}
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap | None] = {}  # shard -> its writable mapping (None: pwrite)
        self._staged: dict[str, bytearray] = {}  # tensor -> its bytes, in shards written with pwrite
        for file, entries in zip(self.files, shards):
            if file in self.finished or file not in self.owned:
                continue
            header, offsets = layout_header([(name, dtype, shape) for name, dtype, shape, _ in entries], SHARD_METADATA)
            fd = os.open(os.path.join(folder, file), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[file] = fd
            os.pwrite(fd, header, 0)
            size = len(header) + sum(e[3] for e in entries)
            reserved = _allocate(fd, size)
            self._maps[file] = _map(fd, size) if reserved and entries else None
            self._pending[file] = [name for name, *_ in entries]
            self._crcs[file] = zlib.crc32(header)
            for name, _, _, nbytes in entries:
                self._where[name] = (offsets[name], nbytes)
            if not entries:
                self._finish(file)
        self._save_manifest()

    def _verified_shards(self) -> dict[str, str]:
        """Owned shards that a manifest of this plan (from any rank) records with a matching checksum."""
        recorded = {}
        for path in glob.glob(os.path.join(self.folder, MANIFEST.format(rank="*"))):
            try:
                with open(path, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("plan") == self.plan_id:
                recorded.update(manifest.get("shards", {}))
        return {file: checksum for file, checksum in recorded.items()
                if file in self.owned and os.path.isfile(os.path.join(self.folder, file))
                and file_checksum(os.path.join(self.folder, file)) == checksum}

    def _save_manifest(self) -> None:
        path = os.path.join(self.folder, MANIFEST.format(rank=self.rank))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"plan": self.plan_id, "shards": self.finished}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def skip(self, name: str) -> bool:
        """Whether this rank has nothing to do for `name`: another rank's shard, or one kept from an
        interrupted run."""
        file = self.weight_map[name]
        return file in self.finished or file not in self.owned

    def buffer(self, name: str) -> memoryview:
        """The bytes of `name` in its shard, to be filled once and then handed to `written`."""
        offset, nbytes = self._where[name]
        mapped = self._maps[self.weight_map[name]]
        if mapped is None:
            return memoryview(self._staged.setdefault(name, bytearray(nbytes)))
        return memoryview(mapped)[offset:offset + nbytes]

    def written(self, name: str) -> None:
        """`name`'s bytes are in place: checksum them (while tensors arrive in file order), unmap
        them, and finish the shard after its last tensor."""
        offset, nbytes = self._where.pop(name)
        file = self.weight_map[name]
        mapped, staged = self._maps[file], self._staged.pop(name, None)
        with (memoryview(staged) if staged is not None else memoryview(mapped)[offset:offset + nbytes]) as data:
            pending = self._pending[file]
            if self._crcs.get(file) is not None and pending[0] == name:
                self._crcs[file] = zlib.crc32(data, self._crcs[file])
            else:
                self._crcs[file] = None  # out of order: the checksum is read back when the shard is done
            pending.remove(name)
            if staged is not None:
                _pwrite_all(self._fds[file], data, offset)
        if mapped is not None:
            unmap_pages(mapped, offset, offset + nbytes)
        if not pending:
            self._finish(file)
            self._save_manifest()

    def _finish(self, file: str) -> None:
        mapped = self._maps.pop(file)
        if mapped is not None:
            mapped.flush()
            mapped.close()
        fd = self._fds.pop(file)
        os.fsync(fd)
        os.close(fd)
        running = self._crcs.pop(file)
        self.finished[file] = (_checksum(running) if running is not None
                               else file_checksum(os.path.join(self.folder, file)))

    def close(self) -> None:
        """Close shards left open (after an error), without marking them finished."""
        for mapped in self._maps.values():
            if mapped is not None:
                with contextlib.suppress(BufferError):  # a view still held by the failed merge: freed with it
                    mapped.close()
        for fd in self._fds.values():
            os.close(fd)
        self._maps, self._fds = {}, {}

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        for path in glob.glob(os.path.join(self.folder, MANIFEST.format(rank="*"))):
            os.remove(path)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _allocate(fd: int, size: int) -> bool:
    """Reserve the shard's blocks up front: a full disk fails here rather than mid-merge, and writes
    into allocated blocks run about twice as fast as into a sparse file. Where the filesystem cannot
    allocate ahead, the file is sized (sparse) and False returned."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        os.ftruncate(fd, size)
        return False
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
        return False


def _map(fd: int, size: int) -> mmap.mmap | None:
    """The shard mapped for writing, or None where the filesystem does not map files (some FUSE
    and network filesystems): its tensors are then written with pwrite."""
    try:
        return mmap.mmap(fd, size)
    except OSError:
        return None
