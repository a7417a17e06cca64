"""Multi-process merges under torchrun: output shards are split across ranks by bytes.

Every rank validates and plans the same recipe (so errors are the same everywhere), writes the
shards it owns into the shared staging folder, and rank 0 publishes after all ranks report
success. The shard layout is the single-process one, so the result is bit-identical to it.
NCCL on GPUs, gloo on CPU; multi-node works with a shared filesystem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    def all_ok(self, error: str | None) -> str | None:
        """Gather every rank's error (None for success); the first one, or None if all succeeded."""
        import torch.distributed

        errors = [None] * self.world
        torch.distributed.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def broadcast(self, value):
        import torch.distributed

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed

        torch.distributed.barrier()


SINGLE = Group(0, 1, 0)


def reports() -> bool:
    """Whether this process says what the merge did: under torchrun, rank 0 alone (the others would
    repeat its lines)."""
    return os.environ.get("RANK", "0") == "0"


def current(device: str) -> Group:
    """The torchrun group this process belongs to (initialised on first use), or SINGLE."""
    world = world_size()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def world_size() -> int:
    """The processes torchrun started for this merge (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def assign(sizes: list[int], world: int) -> list[int]:
    """The rank of each shard: largest first, to the least loaded rank (deterministic)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner
