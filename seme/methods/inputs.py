"""What a merge method receives for one output tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch


@dataclass(frozen=True)
class Inputs:
    """The input tensors of one output tensor, in config order (the base among them, if any)."""

    tensors: tuple  # of torch.Tensor (torch is imported where tensors are made, not here)
    base_index: int | None = None
    name: str = ""  # output tensor name: keys the random streams of DARE / DELLA
    seed: int = 0

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def others(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for i, t in enumerate(self.tensors) if i != self.base_index)

    @property
    def other_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.tensors)) if i != self.base_index)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Half types are merged in float32; float64 stays float64."""
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. aminmax is one vectorised pass (NaN propagates into it), where
    isfinite().all() on bf16 runs about 20 times slower."""
    import torch

    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))
