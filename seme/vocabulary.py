"""One output vocabulary for models whose tokenizers differ (mergekit's `tokenizer_source` and
`tokenizer:`): each model's embedding and LM head rows move to the ids the output vocabulary gives
their tokens, and rows a model lacks take a default, before the method merges them.

The output vocabulary is the base model's (its tokens below its `vocab_size`; without a base model,
the first model's), another model's tokenizer, or the union: the base's tokens, then every other
token of the models, regular ones before added ones, in model order and then id order (mergekit
adds regular tokens in the order of the tokenizers' hash maps, which varies from run to run). A
token that some model lacks gets, in that model, the row of the only model that has it, else the
base model's row where the recipe has a base model that has it, else the mean of the rows of the
models that have it (zero where none has it); `tokenizer.tokens`
names a token's row (zero, or a model's row) instead, for the models that lack it or, with
`force`, for all. Those tokens are added to the output vocabulary where it lacks them. Rows past
the vocabulary (`pad_to_multiple_of`) take the mean of the model's token rows.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from seme.architectures import modules
from seme.errors import SemeError

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

    from seme.io.model import ModelFolder


@dataclass
class Remap:
    size: int  # output rows: the vocabulary, padded
    tokens: int  # tokens in the output vocabulary
    rows: dict[int, list[int]]  # model index -> for each output token id, that token's row in the model, or -1
    reference: int  # the model whose config the output takes: the token ids it names move (config)
    tokenizer: object = None  # a transformers tokenizer to save (union, added tokens); None: copy the source's files
    # tokenizer.tokens: (output token id, model index or None for zeros, row in that model, force)
    overrides: list[tuple[int, int | None, int, bool]] = field(default_factory=list)
    base_tokens: dict[int, str] = field(default_factory=dict)  # the base's tokens by row, to name them
    _index: dict = field(default_factory=dict, repr=False)  # (model, device) -> row indices as a tensor

    def config(self, config: dict) -> dict:
        """The base's `config` for the output vocabulary: its `vocab_size` (a multimodal model's in
        `text_config`, InternVL-chat's in `llm_config`; `vocab_size_per_layer_input` too, the rows of Gemma's
        per-layer token table, re-mapped with the embedding's), and the tokens it names by id (`bos_token_id`,
        `pad_token_id`, a multimodal model's `image_token_index`, ...; Chameleon's `vocabulary_map`) at the
        ids the output gives them. An id that is no token of the base stays; a token the output lacks is an error
        (vocabulary_map drops such entries but its image tokens')."""
        moved = {row: new for new, row in enumerate(self.rows[self.reference]) if row >= 0}

        def token(key, value):
            if isinstance(value, list):
                return [token(key, v) for v in value]
            if isinstance(value, bool) or not isinstance(value, int) or value not in self.base_tokens:
                return value
            if value not in moved:
                raise SemeError(f"config: tokenizer_source: the output vocabulary has no {self.base_tokens[value]!r}, "
                                f"the base model's {key}")
            return moved[value]

        out = {key: token(key, value) if _TOKEN_KEY.search(key) else value for key, value in config.items()}
        if isinstance(out.get("vocabulary_map"), dict):
            out["vocabulary_map"] = self._vocabulary_map(out["vocabulary_map"], moved)
        text = modules.settings_key(out, modules.TEXT)
        if text:
            out[text] = self.config(out[text])
        for key in _ROWS_KEYS:
            if isinstance(out.get(key), int):
                out[key] = self.size
        return out

    def _vocabulary_map(self, vocabulary_map: dict, moved: dict[int, int]) -> dict:
        """Chameleon's `vocabulary_map` (each token's name -> its id: transformers finds its image token, `<image>`,
        there and maps its VQ-VAE's codes to the ids of the IMGIMG tokens) with each base row at the id the output
        gives it. A token the output vocabulary lacks has no row left to name: its entry is dropped (the model never
        reads or writes it), unless it is `<image>` or an image code's, which the model cannot do without."""
        out = {}
        for name, row in vocabulary_map.items():
            if not isinstance(row, int) or isinstance(row, bool) or row not in self.base_tokens:
                out[name] = row  # no token of the base: it names no row that moved
            elif row in moved:
                out[name] = moved[row]
            elif name == "<image>" or name.startswith("IMGIMG"):
                raise SemeError(f"config: tokenizer_source: the output vocabulary has no {self.base_tokens[row]!r}, "
                                f"the base model's vocabulary_map entry {name!r}")
        return out

    def apply(self, models: list[int], tensors: list[torch.Tensor], base: int | None,
              columns: bool = False) -> list[torch.Tensor]:
        """The tensors (rows are tokens; with `columns`, columns are) of the inputs of one task, re-mapped to the
        output vocabulary; a token that several of the models have takes, in the others, the row of `base`
        (TensorTask.remap_base) where it has the token, else their mean. Besides the outputs (the merge's inputs)
        only the rows that take a default are held."""
        import torch

        if columns:  # [k, V]: re-mapped as the rows of its transpose
            return [t.T.contiguous() for t in self.apply(models, [t.T for t in tensors], base)]
        if tensors[0].dim() == 1:  # a head's bias: a value per token, handled as rows of one
            return [t.squeeze(1) for t in self.apply(models, [t.unsqueeze(1) for t in tensors], base)]
        if tensors[0].shape[0] == 1:  # BART's head bias, [1, V] (token rows are at least the tokens: never one)
            return [t.reshape(1, -1) for t in self.apply(models, [t.reshape(-1) for t in tensors], base)]
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        device = tensors[0].device
        rows = [self._rows(m, device) for m in models]
        present = torch.stack([r >= 0 for r in rows])  # [models, tokens]
        count = present.sum(0)
        forced = torch.zeros(self.tokens, dtype=torch.bool, device=device)
        for token, *_, force in self.overrides:
            forced[token] = force
        needed = ((count < len(tensors)) | forced).nonzero().squeeze(1)  # tokens that take a default row
        if needed.numel():
            here, n = present[:, needed], count[needed]
            default = torch.zeros((needed.numel(), *tensors[0].shape[1:]), dtype=dtype, device=device)
            for t, r, p in zip(tensors, rows, here):  # in model order, as mergekit sums them
                default += torch.where(p.unsqueeze(-1), t[r[needed].clamp(min=0)].to(dtype), 0)
            default /= n.clamp(min=1).unsqueeze(-1).to(dtype)  # one model: its row (x / 1 is x)
            if base in models:
                b = models.index(base)
                base_rows = tensors[b][rows[b][needed].clamp(min=0)].to(dtype)
                default = torch.where((here[b] & (n > 1)).unsqueeze(-1), base_rows, default)
            position = {token: i for i, token in enumerate(needed.tolist())}
            for token, model, row, _ in self.overrides:
                if token not in position:  # every model has it and it is not forced: their own rows
                    continue
                if model is None:
                    default[position[token]] = 0
                elif model in models:
                    default[position[token]] = tensors[models.index(model)][row].to(dtype)
                else:
                    raise SemeError("tokenizer.tokens: a token's row comes from a model this tensor is not merged from")
        out = []
        for t, r, p in zip(tensors, rows, present):
            o = torch.empty((self.size, *t.shape[1:]), dtype=dtype, device=device)
            if t.dtype == dtype:  # gathered in place: no temporary as large as the output
                torch.index_select(t, 0, r.clamp(min=0), out=o[:self.tokens])
            else:
                o[:self.tokens] = t[r.clamp(min=0)]
            if needed.numel():
                take = ~p[needed] | forced[needed]
                o[needed[take]] = default[take]
            if self.size > self.tokens:
                o[self.tokens:] = o[:self.tokens].mean(0)
            out.append(o)
        return out

    def _rows(self, model: int, device) -> torch.Tensor:
        import torch

        key = (model, str(device))
        if key not in self._index:
            self._index[key] = torch.tensor(self.rows[model], dtype=torch.long, device=device)
        return self._index[key]


_TOKEN_KEY = re.compile(r"token_(id|index)s?$")  # config keys that name a token by its id
_ROWS_KEYS = ("vocab_size", "vocab_size_per_layer_input")  # config keys that count a table's rows per token


def vocab_size(model: ModelFolder) -> int | None:
    value = model.config.get("vocab_size", model.config.get(modules.settings_key(model.config, modules.TEXT), {}).get(
        "vocab_size"))
    return value if isinstance(value, int) else None


def _two_vocabularies(model: ModelFolder) -> bool:
    """Whether the model's encoder and decoder index two vocabularies (Marian's separate source and
    target vocabularies; FSMT's src_vocab_size and tgt_vocab_size, a dictionary each, whatever their sizes):
    re-mapping reads one, and would move the other stack's rows by it."""
    config = model.config
    decoder = config.get("decoder_vocab_size")
    return (os.path.isfile(os.path.join(model.path, "target_vocab.json"))
            or (isinstance(decoder, int) and decoder != config.get("vocab_size"))
            or "src_vocab_size" in config)


def _with_rows(model: ModelFolder, vocab: dict[str, int]) -> dict[str, int]:
    """The tokens of `vocab` that have rows in the model: below its vocab_size."""
    size = vocab_size(model)
    return {tok: i for tok, i in vocab.items() if size is None or i < size}


def plan(source: str, pad_to_multiple_of: int | None, models: list[ModelFolder], base: int,
         tokenizer: ModelFolder, token_sources: dict | None = None) -> Remap | None:
    """The re-mapping for `source` ("base", "union" or a model, whose folder is `tokenizer`) and
    `token_sources` (Recipe.token_sources), or None where every model already has the output
    vocabulary's tokens at its ids and no other rows (rows past the vocabulary take the mean: a model's
    own there, its padding, do not stay), and no row is forced."""
    token_sources = token_sources or {}
    for m in dict.fromkeys([*models, tokenizer]):
        if _two_vocabularies(m):
            raise SemeError(f"config: tokenizer_source: {m.name} has two vocabularies (source and target); "
                            f"re-mapping tokens needs one vocabulary per model")
    loaded = {}  # each model's tokenizer, loaded once

    def tokenizer_of(m: ModelFolder):
        """Its vocabulary is the one transformers gives it, and a copy of its files: tokenizer.json's tokens and
        those its tokenizer_config.json adds (a pad token it names, its added_tokens_decoder), as in mergekit."""
        if m not in loaded:
            loaded[m] = load_tokenizer(m, "config: tokenizer_source")
        return loaded[m]

    whole = [tokenizer_of(m).get_vocab() for m in models]
    vocabs = {i: _with_rows(m, vocab) for i, (m, vocab) in enumerate(zip(models, whole))}
    past = len(whole[base]) - len(vocabs[base])
    if source in ("base", "union") and past:
        raise SemeError(f"config: tokenizer_source: {source}: the tokenizer of {models[base].name} has "
                        f"{past} tokens past its vocab_size ({vocab_size(models[base])}); give a model "
                        f"whose tokenizer fits")
    built = None
    if source == "union":
        built = _union([tokenizer_of(m) for m in models], base, vocabs)
        out = built.get_vocab()
    elif source == "base":
        out = vocabs[base]
    else:  # the model's whole vocabulary, as mergekit takes it
        out = tokenizer_of(tokenizer).get_vocab()
    missing = [t for t in token_sources if t not in out]
    if missing:  # mergekit adds them to the output tokenizer
        if built is None:
            built = tokenizer_of(models[base] if source == "base" else tokenizer)
        for t in missing:
            built.add_tokens(t)
        out = built.get_vocab()
    tokens = len(out)
    if sorted(out.values()) != list(range(tokens)):
        raise SemeError("config: tokenizer_source: the output vocabulary's ids are not 0..n-1")
    size = tokens if not pad_to_multiple_of else -(-tokens // pad_to_multiple_of) * pad_to_multiple_of
    rows = {}
    for i, vocab in vocabs.items():
        rows[i] = [-1] * tokens
        for tok, new in out.items():
            rows[i][new] = vocab.get(tok, -1)
    overrides = []
    paths = {m.ref: i for i, m in enumerate(models)}
    for token, (spec, force) in token_sources.items():
        where = f"config: tokenizer: tokens: {token!r}"
        if spec[0] == "zero":
            overrides.append((out[token], None, -1, force))
            continue
        if spec[1] not in paths:
            raise SemeError(f"{where}: source {spec[1]} is not among the merged models")
        m = paths[spec[1]]
        if spec[0] == "model":
            row = vocabs[m].get(token, -1)
        else:
            row = spec[2] if isinstance(spec[2], int) else vocabs[m].get(spec[2], -1)
        if not 0 <= row < (vocab_size(models[m]) or row + 1):
            raise SemeError(f"{where}: {models[m].name} has no such token")
        overrides.append((out[token], m, row, force))
    identity = list(range(tokens))
    if not any(force for *_, force in overrides) and size == tokens and \
            all(r == identity and vocab_size(models[i]) == size for i, r in rows.items()):
        return None
    return Remap(size, tokens, rows, base, built, overrides, {i: tok for tok, i in vocabs[base].items()})


class TokenizerCode(SemeError):
    """The model's tokenizer is its own code (tokenizer_config.json's auto_map), which seme never runs."""


def load_tokenizer(model: ModelFolder, what: str):
    """The model's tokenizer as transformers loads it from its files: tokenizer.json, else the vocabulary its class
    reads (vocab.json and merges.txt, a SentencePiece tokenizer.model, ...), with the tokens tokenizer_config.json
    (its added_tokens_decoder, a pad token it names) and added_tokens.json add. Never the model's code: without
    trust_remote_code=False transformers asks on stdin whether to run the code a config's auto_map names.
    Errors start with `what`."""
    if not model.tokenizer_files():  # transformers' error names the classes it tried, not the missing files
        raise SemeError(f"{what}: {model.name} has no tokenizer files to read its vocabulary from")
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        if _tokenizer_code(model):
            raise TokenizerCode(f"{what}: the tokenizer of {model.name} is its own code (tokenizer_config.json's "
                                f"auto_map), which seme never runs") from None
        raise SemeError(f"{what}: cannot load the tokenizer of {model.name}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _tokenizer_code(model: ModelFolder) -> bool:
    try:
        with open(os.path.join(model.path, "tokenizer_config.json"), encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(auto_map, list) or isinstance(auto_map, dict) and "AutoTokenizer" in auto_map


@dataclass(frozen=True)
class Vocabulary:
    """A model's tokens, as load_tokenizer reads them, and how their strings spell text."""

    ids: dict[str, int]  # token -> id
    added: frozenset[str]  # added tokens: their strings are their text
    byte_level: bool  # the others spell bytes in GPT-2's byte-to-unicode alphabet ('Ġ' a space)


def read(model: ModelFolder, what: str) -> Vocabulary | None:
    """The model's vocabulary (load_tokenizer), or None where the folder has no tokenizer files or its tokenizer is
    its own code: no vocabulary seme can read."""
    if not model.tokenizer_files():
        return None
    try:
        tokenizer = load_tokenizer(model, what)
    except TokenizerCode:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a slow (Python) tokenizer has none: no byte level
    decoder = json.loads(backend.decoder.__getstate__()) if backend is not None and backend.decoder else None
    return Vocabulary(tokenizer.get_vocab(), frozenset(t.content for t in tokenizer.added_tokens_decoder.values()),
                      _has_type(decoder, "ByteLevel"))


def _has_type(node, kind: str) -> bool:
    """Whether a tokenizers component's settings (a decoder's; a Sequence nests others) hold one of type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    return isinstance(node, list) and any(_has_type(v, kind) for v in node)


def _union(tokenizers: list, base: int, vocabs: dict[int, dict[str, int]]):
    """The base's tokenizer (`tokenizers[base]`, extended in place) with every other model's tokens added
    (transformers builds the files)."""
    union = tokenizers[base]
    regular, added = {}, {}  # first seen first; a token added in any model is added, as in mergekit
    for i in [base] + [i for i in range(len(tokenizers)) if i != base]:
        tok = tokenizers[i]
        added_here = {t.content: t for t_id, t in tok.added_tokens_decoder.items() if vocabs[i].get(t.content) == t_id}
        for t, _ in sorted(vocabs[i].items(), key=lambda item: item[1]):
            if t in added_here:
                added.setdefault(t, added_here[t])
            else:
                regular.setdefault(t)
    for t in regular:
        if t not in added and t not in vocabs[base]:
            union.add_tokens(t)
    for t in added.values():
        union.add_tokens(t)
    return union
