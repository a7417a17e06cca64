"""Counter-based random numbers for DARE / DELLA masks (Philox4x32-10, the generator Triton uses).

Every element's draw depends only on (seed, tensor name, model index, element index), so a merge is
reproducible whatever the order of execution, the device or the number of threads, and the C++,
Triton and CUDA kernels can draw exactly the same masks as this reference.

Layout: key = `stream_key(seed, tensor, model)` split into (lo, hi) 32-bit words; element `i` uses
counter `(i >> 2) & 0xffffffff, i >> 34, 0, 0` and output word `i & 3`; uniform = (word >> 8) * 2^-24.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def stream_key(seed: int, tensor_name: str, model_index: int) -> int:
    """64-bit FNV-1a of the stream's identity: stable across processes and platforms."""
    h = 0xCBF29CE484222325
    for byte in f"{seed}\0{tensor_name}\0{model_index}".encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products wrap modulo 2^64, so the masked halves are the exact 32x32->64 product.
    p = b * a
    return (p >> 32) & _M32, p & _M32


def philox4x32(key: int, counter: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counters (c0 = counter low word, c1 = high word, c2 = c3 = 0): [n, 4] words."""
    import torch  # here, so that stream_key serves the torch-free engine

    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def uniform(key: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n float32 draws in [0, 1) for the stream `key`, element i at position i."""
    import torch

    counters = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(key, counters).reshape(-1)[:n]
    return (words >> 8).to(torch.float32) * (1.0 / (1 << 24))
