"""Tokenisation, padding and length-bucketed batching (readers: :mod:`prefixtune.data.readers`).

Decoder-only models see ``prompt_ids(source) + target_ids + [eos]``; the loss is taken on the
target and EOS only (labels are -100 on the prompt). :func:`prompt_ids` is the single definition
of the prompt, used both here for training and by generation, so the two never drift apart.

Encoder-decoder models: ``Encoded.input_ids`` holds the *source* ids (the tokenizer's own special
tokens included) and ``Encoded.labels`` the *target* ids (special tokens included, ending in EOS;
no -100 inside). The two lists have different lengths; batch them with :func:`collate_seq2seq`,
whose ``labels`` the model shifts right itself to make its decoder inputs (as HF BART does).

"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prefixtune.data.records import Example

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Token ids of one example; ``labels`` is -100 where no loss is taken (decoder-only prompt)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodeStats:
    """How many examples :func:`encode` had to truncate (so the caller can warn once)."""

    n_examples: int = 0
    n_source_truncated: int = 0
    n_target_truncated: int = 0

    def warning(self) -> str | None:
        """A one-line message when anything was truncated, else None."""
        if not (self.n_source_truncated or self.n_target_truncated):
            return None
        return (
            f"truncated {self.n_source_truncated} of {self.n_examples} sources and "
            f"{self.n_target_truncated} of {self.n_examples} targets to the token limits"
        )


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts BOS first by default (Llama/SmolLM style), False for GPT-2."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Plain token ids (no special tokens) for many texts: one tokenizer call on the distinct texts
    (E2E repeats each source ~9 times)."""
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    table = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    return [list(table[t]) for t in texts]


def _prompt_parts(tokenizer: Any, separator: str) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    sep = _ids(tokenizer, [separator])[0] if separator else []
    return bos, sep


def _assemble(
    src: list[int], bos: list[int], sep: list[int], max_tokens: int | None
) -> tuple[list[int], bool]:
    """``bos + src + sep``, cutting the end of ``src`` so the whole fits in ``max_tokens``."""
    if max_tokens is None:
        return bos + src + sep, False
    budget = max_tokens - len(bos) - len(sep)
    if budget < 1:
        raise ValueError(
            f"max_source_tokens={max_tokens} leaves no room for the source after "
            f"{len(bos)} BOS and {len(sep)} separator tokens"
        )
    return bos + src[:budget] + sep, len(src) > budget


def prompt_ids(
    source: str, tokenizer: Any, *, separator: str = "\n", max_source_tokens: int | None = None
) -> list[int]:
    """The ids a decoder-only model is fed before generating: [BOS] + source + separator.

    BOS is added only when the tokenizer adds one by default. ``max_source_tokens`` limits the
    whole prompt (BOS and separator included); a longer source loses its end, never the separator.
    The source and the separator are tokenized separately (no merge across the boundary).
    """
    bos, sep = _prompt_parts(tokenizer, separator)
    return _assemble(_ids(tokenizer, [source])[0], bos, sep, max_source_tokens)[0]


def encode_prompt(
    source: str,
    tokenizer: Any,
    *,
    encoder_decoder: bool,
    separator: str = "\n",
    max_source_tokens: int | None = None,
) -> list[int]:
    """The ids any model is fed for `source` before generating (evaluation and serving).

    Decoder-only: :func:`prompt_ids` in the format the prefix was trained with (its
    `separator`). Encoder-decoder: the tokenized source, cut to ``max_source_tokens`` if given
    (the separator is unused there).
    """
    if not encoder_decoder:
        return prompt_ids(
            source, tokenizer, separator=separator, max_source_tokens=max_source_tokens
        )
    if max_source_tokens is None:
        return list(tokenizer(source)["input_ids"])
    return list(tokenizer(source, truncation=True, max_length=max_source_tokens)["input_ids"])


def _truncate_keep_tail(ids: list[int], max_len: int, n_tail: int) -> list[int]:
    """Cut ``ids`` to ``max_len`` keeping its last ``n_tail`` (special) tokens."""
    return ids[: max_len - n_tail] + ids[len(ids) - n_tail :]


def _n_trailing_special(ids: list[int], special: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[len(ids) - 1 - n] in special:
        n += 1
    return n


def _encode_decoder_only(
    examples: Sequence[Example], tokenizer: Any, eos: int, max_src: int, max_tgt: int, sep: str
) -> tuple[list[Encoded], EncodeStats]:
    stats = EncodeStats(n_examples=len(examples))
    bos, sep_ids = _prompt_parts(tokenizer, sep)
    sources = _ids(tokenizer, [e.source for e in examples])
    targets = _ids(tokenizer, [e.target for e in examples])
    out = []
    for src, tgt in zip(sources, targets, strict=True):
        prompt, cut = _assemble(src, bos, sep_ids, max_src)
        stats.n_source_truncated += cut
        if len(tgt) + 1 > max_tgt:
            tgt = tgt[: max_tgt - 1]
            stats.n_target_truncated += 1
        answer = tgt + [eos]
        out.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out, stats


def _encode_seq2seq(
    examples: Sequence[Example], tokenizer: Any, eos: int, max_src: int, max_tgt: int
) -> tuple[list[Encoded], EncodeStats]:
    stats = EncodeStats(n_examples=len(examples))
    special = set(tokenizer.all_special_ids)
    sources = tokenizer([e.source for e in examples])["input_ids"] if examples else []
    targets = tokenizer([e.target for e in examples])["input_ids"] if examples else []
    out = []
    for src, tgt in zip(sources, targets, strict=True):
        src, tgt = list(src), list(tgt)
        if not tgt or tgt[-1] != eos:
            tgt.append(eos)
        if len(src) > max_src:
            n_tail = min(_n_trailing_special(src, special), max_src - 1)
            src = _truncate_keep_tail(src, max_src, n_tail)
            stats.n_source_truncated += 1
        if len(tgt) > max_tgt:
            tgt = _truncate_keep_tail(tgt, max_tgt, 1)
            stats.n_target_truncated += 1
        out.append(Encoded(src, tgt))
    return out, stats


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    encoder_decoder: bool,
    max_source_tokens: int,
    max_target_tokens: int,
    separator: str = "\n",
) -> tuple[list[Encoded], EncodeStats]:
    """Token ids and labels for training, plus truncation counts.

    Decoder-only: ``input_ids = prompt_ids(source) + target_ids + [eos]``, labels -100 on the
    prompt. ``max_source_tokens`` bounds the prompt (see :func:`prompt_ids`), ``max_target_tokens``
    the supervised part (target + EOS). Encoder-decoder: see the module docstring; the limits
    bound the source and label lists, keeping the final EOS. The separator is unused there.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set one before encoding")
    if max_target_tokens < 2 or max_source_tokens < 2:
        raise ValueError(
            f"max_source_tokens ({max_source_tokens}) and max_target_tokens "
            f"({max_target_tokens}) must be at least 2"
        )
    if encoder_decoder:
        return _encode_seq2seq(examples, tokenizer, eos, max_source_tokens, max_target_tokens)
    return _encode_decoder_only(
        examples, tokenizer, eos, max_source_tokens, max_target_tokens, separator
    )


def _pad(rows: Sequence[list[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) long tensor of ``rows`` padded with ``value`` and its (B, T) 0/1 mask."""
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {side!r}")
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        out[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def collate(
    items: Sequence[Encoded], pad_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Decoder-only batch: ``input_ids``, ``attention_mask``, ``labels`` (all (B, T) long).

    Pads come from the row lengths (never from comparing ids with ``pad_id``, which may equal
    EOS); labels are -100 on pads.
    """
    for it in items:
        if len(it.input_ids) != len(it.labels):
            raise ValueError(
                "input_ids and labels differ in length; use collate_seq2seq for encoder-decoder"
            )
    input_ids, mask = _pad([it.input_ids for it in items], pad_id, padding_side)
    labels, _ = _pad([it.labels for it in items], IGNORE_INDEX, padding_side)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_seq2seq(
    items: Sequence[Encoded], pad_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Encoder-decoder batch: source ``input_ids``/``attention_mask`` (B, S) padded on
    ``padding_side``; ``labels`` (B, T) right-padded with -100 and ``decoder_attention_mask``
    (B, T), 1 on the label positions (the model builds decoder inputs by shifting labels)."""
    input_ids, mask = _pad([it.input_ids for it in items], pad_id, padding_side)
    labels, dec_mask = _pad([it.labels for it in items], IGNORE_INDEX, "right")
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "decoder_attention_mask": dec_mask,
    }


def _split_by_tokens(
    chunk: list[int], lengths: Sequence[int], bs: int, max_tokens: int | None
) -> list[list[int]]:
    """Consecutive batches of ``chunk`` with <= bs rows and rows * longest <= max_tokens."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in chunk:
        grown = max(longest, lengths[i])
        over = max_tokens is not None and (len(cur) + 1) * grown > max_tokens
        if cur and (len(cur) == bs or over):
            batches.append(cur)
            cur, grown = [], lengths[i]
        cur.append(i)
        longest = grown
    if cur:
        batches.append(cur)
    return batches


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Batches of indices into ``lengths`` grouping similar lengths; every index exactly once.

    ``shuffle=True``: shuffle the indices with ``seed``, sort each chunk of ``50 * batch_size``
    by length, cut it into batches, then shuffle the batch order (same seed -> same batches).
    ``shuffle=False``: one global sort, longest first (evaluation; map outputs back by index).
    ``max_tokens`` additionally caps ``rows * longest row`` (a single longer row stays alone).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return _split_by_tokens(order, lengths, batch_size, max_tokens)
    rng = random.Random(seed)
    rng.shuffle(order)
    chunk = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(_split_by_tokens(part, lengths, batch_size, max_tokens))
    rng.shuffle(batches)
    return batches


@dataclass
class Batches:
    """A training run's micro-batches: length-bucketed, reshuffled per epoch, numbered across
    the run epoch after epoch; `get(m)` collates micro-batch m on demand.

    Epoch e's batches are ``length_bucketed_batches(..., seed=seed + e)``. With ``max_tokens``
    each epoch's shuffle gives its own number of batches, so epoch e starts where epoch e-1
    ended: ``_starts`` holds those first indices, counted from the seeded plans as far as asked.
    """

    items: list[Encoded]
    collate: Callable[[list[Encoded]], dict[str, torch.Tensor]]
    batch_size: int
    seed: int = 0
    max_tokens: int = 0  # rows x longest row per batch (0: no cap)
    _epoch: int = -1
    _order: list[list[int]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=lambda: [0])  # _starts[e]: epoch e's first batch

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("no items to batch")
        self.lengths = [len(it.input_ids) + len(it.labels) for it in self.items]
        self.per_epoch = self.start(1)  # epoch 0's batches (every epoch's without a token cap)

    def _batches(self, epoch: int) -> list[list[int]]:
        return length_bucketed_batches(self.lengths, self.batch_size, seed=self.seed + epoch,
                                       max_tokens=self.max_tokens or None)  # fmt: skip

    def start(self, epoch: int) -> int:
        """Index of epoch `epoch`'s first micro-batch (= micro-batches in the epochs before)."""
        while len(self._starts) <= epoch:
            self._starts.append(self._starts[-1] + len(self._batches(len(self._starts) - 1)))
        return self._starts[epoch]

    def total(self, epochs: float) -> int:
        """Micro-batches in `epochs` passes; a fractional last pass takes that share of its
        epoch's batches, rounded up."""
        whole = math.floor(epochs)
        part = self.start(whole + 1) - self.start(whole) if epochs > whole else 0
        return self.start(whole) + math.ceil((epochs - whole) * part)

    def epoch_of(self, index: int) -> int:
        """The epoch micro-batch `index` belongs to."""
        while self._starts[-1] <= index:  # count one more epoch
            self.start(len(self._starts))
        return bisect.bisect_right(self._starts, index) - 1

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` of the run, collated."""
        epoch = self.epoch_of(index)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._batches(epoch)
        return self.collate([self.items[i] for i in self._order[index - self._starts[epoch]]])
