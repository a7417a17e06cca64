"""Vocabulary maps between models whose tokenizers differ: shared tokens by exact string, then by a
normalised string (byte-level 'Ġ' and sentencepiece '▁' word markers read as a space, NFKC)."""
from __future__ import annotations

import unicodedata


def normalize(token: str) -> str:
    return unicodedata.normalize("NFKC", token.replace("Ġ", " ").replace("▁", " "))


def token_map(pivot: dict[str, int], source: dict[str, int], pivot_size: int) -> list[int]:
    """For each pivot token id, the source id of the same token, or -1."""
    out = [-1] * pivot_size
    by_norm: dict[str, int] = {}
    for tok, i in source.items():
        by_norm.setdefault(normalize(tok), i)
    for tok, i in pivot.items():
        if 0 <= i < pivot_size:
            j = source.get(tok)
            out[i] = j if j is not None else by_norm.get(normalize(tok), -1)
    return out
