"""Multi-process merges under torchrun: the output tensors are split across ranks by bytes.

Every rank validates and plans the same recipe (so errors are the same everywhere), writes its
tensors into the shards of the shared staging folder, and rank 0 publishes after all ranks report
success. The shard layout is the single-process one, so the result is bit-identical to it.
The ranks exchange only errors and warnings, over gloo (on GPUs too: NCCL would want each rank's
device set before the first exchange); multi-node works with a shared filesystem.

Rank 0 alone says what the merge did (`reports`). Torchrun ends every rank as soon as one ends
with an error, so a rank that fails tells the others before it ends, at the next point where
the ranks agree (`Group.agree`, or `Group.share`, which exchanges data in the same exchange, so
that exchanges always pair up): the merge's own agreements, or the one that `join` makes for an
error met outside them.
"""
from __future__ import annotations

import bisect
import itertools
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

from seme.errors import SemeError


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    def agree(self, error: str | None, said: Sequence[str] = ()) -> str | None:
        """Gather every rank's error (None for success) and the warnings it met while merging; warn
        those (seme.api shows rank 0's) and return the first error, or None if every rank succeeded."""
        return self._exchange(error, said, None)[0]

    def share(self, payload) -> list:
        """Every rank's `payload` (picklable, on the CPU), in rank order. An agreement too: where a
        rank met an error instead (and agrees on it), its error is raised on every rank, agreed."""
        error, payloads = self._exchange(None, (), payload)
        if error:
            raise SemeError(error)
        return payloads

    def _exchange(self, error: str | None, said: Sequence[str], payload) -> tuple[str | None, list]:
        import torch.distributed

        global _failed
        outcomes = [None] * self.world
        torch.distributed.all_gather_object(outcomes, (error, list(said), payload))
        for _, messages, _ in outcomes:
            for message in messages:
                warnings.warn(message)
        error = next((e for e, _, _ in outcomes if e), None)
        _failed = _failed or error is not None
        return error, [p for _, _, p in outcomes]


_failed = False  # whether the ranks have agreed on an error: each ends with it, and none agrees again


def agreed_failure() -> bool:
    """Whether the ranks have agreed on an error: this rank ends with it, exchanging nothing more."""
    return _failed


SINGLE = Group(0, 1, 0)


def reports() -> bool:
    """Whether this process says what the merge did (its plan, warnings, errors, result): under
    torchrun, rank 0 alone. Every rank plans the same merge, so the others would repeat its lines;
    what only another rank meets reaches rank 0 through `Group.agree`."""
    return world_size() <= 1 or os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """The processes torchrun started for this merge (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> Group:
    """The torchrun group this process belongs to (initialised on first use), or SINGLE."""
    world = world_size()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo")
        except (ValueError, RuntimeError) as e:  # WORLD_SIZE set outside torchrun, say, without its other variables
            raise SemeError(f"WORLD_SIZE={world} asks for a merge over {world} processes, but they could not "
                            f"be joined (start it with torchrun, or unset WORLD_SIZE): {e}") from None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def settle() -> None:
    """Under torchrun, an agreement once every rank has done its part without one (a --dry-run's
    plan): a rank that failed meanwhile tells the others here (`join`), and each raises its error."""
    if world_size() <= 1 or _failed:
        return
    error = current().agree(None)
    if error:
        raise SemeError(error)


def join(error: str) -> None:
    """Under torchrun, hand `error`, met outside the merge's agreements (planning, say: every rank
    meets it), to the next agreement, so that rank 0 hears of it and says it before any rank ends."""
    if _failed:  # the error was agreed on
        return
    try:
        group = current()
    except SemeError:  # no group to tell: this process says the error itself (`reports`)
        return
    if group.world > 1:
        group.agree(error)


def split(sizes: list[int], world: int) -> list[int]:
    """The rank of each output tensor (sizes in bytes, in the plan's order): contiguous runs, rank 0
    first, the largest run as small as contiguous runs allow. A run may cross shard boundaries and
    a shard hold several runs (`seme.io.writer.ShardWriter` writes each rank's piece of it), so the
    work is shared whatever the shard size."""
    ends = list(itertools.accumulate(sizes, initial=0))  # ends[i]: the bytes of tensors before i

    def starts(most: int) -> list[int] | None:
        """Where each run starts, filling ranks up to `most` bytes in turn; None past `world` runs."""
        found, i = [], 0
        while i < len(sizes):
            if len(found) == world:
                return None
            found.append(i)
            i = max(i + 1, bisect.bisect_right(ends, ends[i] + most) - 1)
        return found

    low, high = max(sizes, default=0), ends[-1]
    while low < high:  # the least `most` that `world` runs can take
        middle = (low + high) // 2
        if starts(middle) is None:
            low = middle + 1
        else:
            high = middle
    bounds = [*starts(low), len(sizes)]
    return [rank for rank in range(len(bounds) - 1) for _ in range(bounds[rank], bounds[rank + 1])]
