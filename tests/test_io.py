"""Safetensors headers are validated before anything is mapped; the writer's files are standard."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from seme.errors import SemeError
from seme.io.safetensors_file import MappedFile, read_header
from seme.io.writer import ShardWriter


def raw_file(path, header: dict, data: bytes = b"") -> str:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4, dtype=torch.int64),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    infos, _ = read_header(str(tmp_path / "m.safetensors"))
    mapped = MappedFile(str(tmp_path / "m.safetensors"))
    for name, t in tensors.items():
        assert torch.equal(mapped.tensor(infos[name]), t)


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "beyond the end of the file"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "do not match shape [4] x F32"),
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype 'Q4'"),
    ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unknown dtype ['F32']"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
    ({"a": {"dtype": "F32"}}, b"", "malformed header entry"),
])
def test_hostile_headers_are_refused_with_file_and_tensor_named(tmp_path, header, data, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SemeError, match="bad.safetensors") as e:
        read_header(path)
    assert message in str(e.value)


def test_truncated_and_garbage_files(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SemeError, match="shorter than 8 bytes"):
        read_header(str(tmp_path / "short.safetensors"))
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(SemeError, match="declares 1000000000000 bytes"):
        read_header(str(tmp_path / "huge.safetensors"))
    (tmp_path / "nojson.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(SemeError, match="not JSON"):
        read_header(str(tmp_path / "nojson.safetensors"))
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than the JSON parser's recursion
    (tmp_path / "nested.safetensors").write_bytes(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(SemeError, match="not JSON"):
        read_header(str(tmp_path / "nested.safetensors"))


def _put(writer: ShardWriter, name: str, tensor: torch.Tensor) -> None:
    with writer.buffer(name) as out:
        out[:] = tensor.numpy().tobytes()
    writer.written(name)


def test_writer_shards_load_with_safetensors(tmp_path):
    tensors = {f"t{i}": torch.randn(100 + i) for i in range(10)}
    planned = [(n, "F32", tuple(t.shape), t.numel() * 4) for n, t in tensors.items()]
    writer = ShardWriter(str(tmp_path), planned, shard_size=1000, plan_id="p")
    for name in reversed(list(tensors)):  # any order: offsets are fixed up front
        _put(writer, name, tensors[name])
    writer.close()
    writer.write_index()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p[3] for p in planned)
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / file)))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def _write_shards(folder, direct_io, tensors, order):
    planned = [(n, "F32", tuple(t.shape), t.numel() * 4) for n, t in tensors.items()]
    folder.mkdir()
    writer = ShardWriter(str(folder), planned, shard_size=40_000, plan_id="p", direct_io=direct_io)
    direct = dict(writer._direct_fds)
    for name in order:
        _put(writer, name, tensors[name])
    writer.write_index()
    writer.remove_manifests()
    return direct, {f.name: f.read_bytes() for f in folder.iterdir()}


# Sizes around the 4 KiB blocks: tensors inside one block, across two, ending on a boundary, many
# blocks long, at offsets that fall anywhere in a block.
DIRECT_SIZES = (1, 7, 1023, 1024, 1025, 2048, 3000, 4096 + 1, 5000, 20_000, 9)


def test_direct_writes_give_the_buffered_bytes(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate(DIRECT_SIZES)}
    _, buffered = _write_shards(tmp_path / "buffered", False, tensors, list(tensors))
    writes = []  # (fd, length, offset)
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: writes.append((fd, len(data), offset)) or pwrite(fd, data, offset))
    direct, written = _write_shards(tmp_path / "direct", True, tensors, list(reversed(tensors)))
    assert written == buffered and len([f for f in written if f.endswith(".safetensors")]) > 1
    if not direct:
        pytest.skip("this filesystem takes no O_DIRECT")  # the bytes are still checked above
    big = [w for w in writes if w[0] in direct.values()]
    assert big and all(length % 4096 == 0 and offset % 4096 == 0 for _, length, offset in big)
    assert sum(length for _, length, _ in big) > sum(t.numel() * 4 for t in tensors.values()) // 2


@pytest.mark.parametrize("refuses", ["open", "write"])
def test_direct_writes_fall_back_where_the_filesystem_refuses_them(tmp_path, monkeypatch, refuses):
    import errno

    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate(DIRECT_SIZES)}
    _, buffered = _write_shards(tmp_path / "buffered", False, tensors, list(tensors))
    opened, direct_fds = os.open, set()

    def open_(path, flags, *mode):
        if flags & os.O_DIRECT and refuses == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = opened(path, flags, *mode)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    pwrite = os.pwrite

    def pwrite_(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite_)
    _, written = _write_shards(tmp_path / "fallback", True, tensors, list(tensors))
    assert written == buffered


def test_writer_resumes_only_verified_shards_of_the_same_plan(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(6)}
    planned = [(n, "F32", (100,), 400) for n in tensors]
    first = ShardWriter(str(tmp_path), planned, shard_size=800, plan_id="p")
    for name in ["t0", "t1", "t2"]:  # shard 1 finished, shard 2 half written
        _put(first, name, tensors[name])
    first.close()
    again = ShardWriter(str(tmp_path), planned, shard_size=800, plan_id="p", resume=True)
    assert [n for n in tensors if again.skip(n)] == ["t0", "t1"]
    again.close()
    other_plan = ShardWriter(str(tmp_path), planned, shard_size=800, plan_id="q", resume=True)
    assert not any(other_plan.skip(n) for n in tensors)
    other_plan.close()
    corrupt = ShardWriter(str(tmp_path), planned, shard_size=800, plan_id="q")
    for name in ["t0", "t1"]:
        _put(corrupt, name, tensors[name])
    corrupt.close()
    with open(tmp_path / "model-00001-of-00003.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    damaged = ShardWriter(str(tmp_path), planned, shard_size=800, plan_id="q", resume=True)
    assert not damaged.skip("t0")  # its checksum no longer matches: merged again
    damaged.close()


def _ranks_write(folder, planned, tensors, world, ranks=None, resume=False, shard_size=1000):
    """The shards as `world` ranks write them (those of `ranks`; ShardWriters side by side, as the
    ranks of a torchrun merge), and the tensors each rank merged (those it did not skip)."""
    writers = [ShardWriter(str(folder), planned, shard_size, "p", resume=resume, rank=r, world=world)
               for r in (range(world) if ranks is None else ranks)]
    merged = []
    for writer in writers:
        merged.append([n for n in tensors if not writer.skip(n)])
        for name in merged[-1]:
            _put(writer, name, tensors[name])
        writer.close()
    return merged


def test_ranks_write_their_pieces_of_shared_shards(tmp_path, monkeypatch):
    from seme.io import writer

    tensors = {f"t{i}": torch.randn(50 + 7 * i) for i in range(9)}
    planned = [(n, "F32", tuple(t.shape), t.numel() * 4) for n, t in tensors.items()]
    single = tmp_path / "single"
    single.mkdir()
    assert _ranks_write(single, planned, tensors, 1) == [list(tensors)]
    shards = sorted(f for f in os.listdir(single) if f.endswith(".safetensors"))
    infos = {name: info for f in shards for name, info in read_header(str(single / f))[0].items()}
    assert len(shards) == 4
    locks = []
    real_lockf = writer.fcntl.lockf
    monkeypatch.setattr(writer.fcntl, "lockf", lambda fd, op, length, start: (
        locks.append((fd, os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), op, start, length)),
        real_lockf(fd, op, length, start)))
    for world in (2, 3, 12):
        folder = tmp_path / str(world)
        folder.mkdir()
        locks.clear()
        merged = _ranks_write(folder, planned, tensors, world)
        assert sum(merged, []) == list(tensors) and all(merged[:len(tensors)])
        rank_of = {name: r for r, names in enumerate(merged) for name in names}
        runs_in = {f: {rank_of[n] for n, info in infos.items() if info.path.endswith(f)} for f in shards}
        assert any(len(ranks) > 1 for ranks in runs_in.values())  # a shard written by several ranks
        if world < 4:  # and a rank writing in several shards
            assert any(len({infos[n].path for n in names}) > 1 for names in merged)
        for f in shards:
            assert (folder / f).read_bytes() == (single / f).read_bytes(), (world, f)
        # Where two ranks' pieces meet inside a block, each writes its bytes of it under a lock (the
        # writers are open side by side: one descriptor per rank).
        for a, b in zip(list(tensors), list(tensors)[1:]):
            if rank_of[a] != rank_of[b] and infos[a].path == infos[b].path and infos[b].start % writer.DIRECT_BLOCK:
                f, at = os.path.basename(infos[b].path), infos[b].start
                held = {fd for fd, file, op, s, n in locks if file == f and op == writer.fcntl.LOCK_EX and s <= at < s + n}
                assert len(held) >= 2, (world, a, b)
        assert [op for _, _, op, _, _ in locks].count(writer.fcntl.LOCK_UN) == len(locks) / 2 > 0


def test_a_resume_keeps_what_any_number_of_ranks_finished(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(6)}
    planned = [(n, "F32", (100,), 400) for n in tensors]  # shards of 2 tensors
    whole = tmp_path / "whole"
    whole.mkdir()
    _ranks_write(whole, planned, tensors, 1)
    assert _ranks_write(whole, planned, tensors, 3, resume=True) == [[], [], []]  # pieces within finished shards
    assert _ranks_write(whole, planned, tensors, 4, resume=True) == [[], [], [], []]
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    _ranks_write(pieces, planned, tensors, 3, shard_size=1200)  # runs t0 t1 | t2 t3 | t4 t5, shards t0-t2 | t3-t5
    assert _ranks_write(pieces, planned, tensors, 1, resume=True, shard_size=1200) == [[]]  # adjacent pieces
    partial = tmp_path / "partial"
    partial.mkdir()
    _ranks_write(partial, planned, tensors, 3, ranks=[1], shard_size=1200)  # ranks 0 and 2 interrupted
    assert _ranks_write(partial, planned, tensors, 3, resume=True, shard_size=1200) == [["t0", "t1"], [], ["t4", "t5"]]
    with open(partial / "model-00001-of-00002.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")  # t2, in rank 1's piece, damaged
    assert _ranks_write(partial, planned, tensors, 2, resume=True, shard_size=1200) == [["t0", "t1", "t2"], []]
    for f in os.listdir(pieces):
        if f.endswith(".safetensors"):
            assert (partial / f).read_bytes() == (pieces / f).read_bytes()


def test_a_rank_that_rewrote_its_manifest_keeps_what_it_recorded_for_the_others(tmp_path):
    # A 1-process merge resumed by 2 ranks: rank 0 redoes its piece and rewrites manifest 0 before
    # rank 1 reads it. Rank 1 must still find its pieces there, and rank 0 every tensor's notes.
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(4)}
    planned = [(n, "F32", (100,), 400) for n in tensors]
    notes = {n: {"drift": i} for i, n in enumerate(tensors)}
    first = ShardWriter(str(tmp_path), planned, shard_size=10_000, plan_id="p", notes=dict(notes))
    for name in tensors:
        _put(first, name, tensors[name])
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(-1000, 2)
        f.write(b"\xff")  # in t1, rank 0's: its piece is merged again
    rank0 = ShardWriter(str(tmp_path), planned, shard_size=10_000, plan_id="p", resume=True, world=2)
    assert [n for n in tensors if not rank0.skip(n)] == ["t0", "t1"]
    for name in ["t0", "t1"]:
        _put(rank0, name, tensors[name])  # manifest 0 saved anew
    rank1 = ShardWriter(str(tmp_path), planned, shard_size=10_000, plan_id="p", resume=True, rank=1, world=2)
    assert all(rank1.skip(n) for n in tensors)
    assert rank0.all_notes() == notes


def test_staging_buffers_are_reused_and_take_no_room_until_written():
    import resource

    from seme.io.writer import _Buffers

    buffers = _Buffers(64 << 20)  # the largest planned tensor: every buffer fits every tensor
    a, b = buffers.take(), buffers.take()
    assert len(a) == len(b) == 64 << 20 and a is not b and a[:100] == bytes(100)
    buffers.give(a)
    assert buffers.take() is a and buffers.free == []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c = buffers.take()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 100  # 16384 pages, none touched
    c[:200] = b"x" * 200
    assert bytes(c[:200]) == b"x" * 200


@pytest.mark.parametrize("isa", ["baseline", "avx512"])  # bytewise; carry-less multiplies where the CPU has them
def test_native_crc32_is_zlibs(isa, monkeypatch):
    import random
    import zlib

    from seme import _C

    monkeypatch.setenv("SEME_CPU_ISA", isa)
    if isa == "baseline":
        assert not _C.crc32_accelerated()
    rng = random.Random(0)
    for n in [*range(0, 200), 1023, 4096, 65536 + 5, (1 << 20) + 3]:
        data = rng.randbytes(n)
        for crc in (0, 1, 0xFFFFFFFF, rng.getrandbits(32)):
            assert _C.crc32(data, crc) == zlib.crc32(data, crc), (n, crc)
        cut = rng.randrange(n + 1)
        assert _C.crc32(data[cut:], _C.crc32(data[:cut])) == zlib.crc32(data)  # chained, as the writer does
    view = memoryview(bytearray(rng.randbytes(1000)))[7:900]
    assert _C.crc32(view) == zlib.crc32(view)
    with pytest.raises(ValueError, match="contiguous"):
        _C.crc32(memoryview(bytearray(100))[::2])
