"""Vocabulary maps between models whose tokenizers differ (METHOD §3: exact string match, then normalised match):
shared tokens by exact string, then by the text they spell, NFKC-normalised. A byte-level BPE token spells the
bytes of its characters in GPT-2's byte-to-unicode alphabet ('Ġthe' is b' the', 'Ã©' b'\\xc3\\xa9'); any other
spells its own characters with SentencePiece's '▁' for a space and '<0xNN>' for a byte (byte fallback). So a
byte-level model and a SentencePiece one share the tokens that spell the same text, not only those of ASCII words."""
from __future__ import annotations

import re
import unicodedata

from seme.vocabulary import Vocabulary

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()


def spelled(token: str, vocabulary: Vocabulary) -> str | bytes:
    """What a token of `vocabulary` spells: its text, NFKC-normalised, or its bytes where they are no UTF-8 text
    (a piece of a character)."""
    if token in vocabulary.added:
        data = token.encode()
    elif vocabulary.byte_level and all(c in _BYTE_OF for c in token):
        data = bytes(_BYTE_OF[c] for c in token)
    elif m := _BYTE_TOKEN.fullmatch(token):
        data = bytes([int(m[1], 16)])
    else:
        data = token.replace("▁", " ").encode()
    try:
        return unicodedata.normalize("NFKC", data.decode())
    except UnicodeDecodeError:
        return data


def token_map(pivot: Vocabulary, source: Vocabulary, pivot_size: int) -> list[int]:
    """For each pivot token id, the source id of the same token (the same string, else the same text), or -1. Where
    several source tokens spell the same text, the lowest id stands for them."""
    out = [-1] * pivot_size
    by_text: dict[str | bytes, int] = {}
    for tok, i in sorted(source.ids.items(), key=lambda item: item[1]):  # get_vocab's order varies from run to run
        by_text.setdefault(spelled(tok, source), i)
    for tok, i in pivot.ids.items():
        if 0 <= i < pivot_size:
            text, j = spelled(tok, pivot), source.ids.get(tok)
            # the same string is the same token only where it spells the same text: byte-level 'Ġ' is a space,
            # SentencePiece's a letter
            out[i] = j if j is not None and spelled(tok, source) == text else by_text.get(text, -1)
    return out
