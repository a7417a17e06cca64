"""Vocabulary maps between models whose tokenizers differ: shared tokens by exact string, then by a
normalised string (byte-level 'Ġ' and sentencepiece '▁' word markers read as a space, NFKC)."""
from __future__ import annotations

import json
import os
import unicodedata

from seme.errors import SemeError


def read_vocab(folder: str) -> dict[str, int] | None:
    """token -> id from tokenizer.json (or vocab.json), added tokens included; None without a tokenizer."""
    path = os.path.join(folder, "tokenizer.json")
    vocab: dict[str, int] = {}
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            model_vocab = data.get("model", {}).get("vocab", {})
            if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
                vocab = {piece: i for i, (piece, _) in enumerate(model_vocab)}
            else:
                vocab = dict(model_vocab)
            for tok in data.get("added_tokens", []):
                vocab[tok["content"]] = tok["id"]
            return vocab
        path = os.path.join(folder, "vocab.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return dict(json.load(f))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SemeError(f"{path}: cannot read the vocabulary: {e}") from None
    return None


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
