"""Output writing: safetensors shards laid out from the plan, then streamed tensor by tensor."""
from __future__ import annotations

import json
import os

import torch

from seme.io.safetensors_file import layout_header

SHARD_METADATA = {"format": "pt"}


class ShardWriter:
    """Writes planned tensors (name, dtype code, shape, nbytes) into shards of at most `shard_size` bytes.

    Shard boundaries and every tensor's offset are fixed up front, so tensors can be written in any
    order, each straight to disk, and no shard is ever buffered in memory.
    """

    def __init__(self, folder: str, planned: list[tuple[str, str, tuple[int, ...], int]], shard_size: int):
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
        self.folder = folder
        self.where: dict[str, tuple[int, int]] = {}  # tensor -> (file descriptor, offset)
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(e[3] for e in planned)
        self._fds = []
        for file, entries in zip(self.files, shards):
            header, offsets = layout_header([(name, dtype, shape) for name, dtype, shape, _ in entries], SHARD_METADATA)
            fd = os.open(os.path.join(folder, file), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(e[3] for e in entries))
            for name, _, _, _ in entries:
                self.where[name] = (fd, offsets[name])
                self.weight_map[name] = file

    def write(self, name: str, tensor) -> None:
        """Write a CPU tensor of the planned dtype and shape to its place."""
        fd, offset = self.where[name]
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written

    def close(self) -> None:
        """Flush every shard to disk and write the index."""
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
