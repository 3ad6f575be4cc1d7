"""Continuous batching: a running decode batch that new rows join between decode steps.

Built from generate.py's pieces: `prefill_decoder` runs the newcomers' prompts with their
prefixes written into a fresh KV cache ("seeded", so the cache rows carry everything a row
needs), `DecodeState.step` advances every row by one token, and `pick_tokens` /
`ban_repeated_ngrams` choose the tokens. Joining is a cache merge: both caches are left-padded
to the same number of key columns (masked out) and concatenated along the batch. Finished rows
leave through `DecodeState.select`; key columns no row can see any more are cut off.

Works for decoder-only models whose cache can be seeded (no sliding-window layers). Each row
keeps its own decoding options and, when sampling, its own random generator seeded from the
request, so a row's tokens do not depend on which other rows share its batch.

Rows are isolated: a row whose logits are not finite (e.g. a prefix holding NaN) or whose token
choice raises finishes alone with `stop == "error"` and a message in `error`, and `remove` takes
rows out between steps (cancelled requests); the other rows decode on unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.config import GenerateConfig
from prefixtune.core.attention import PrefixKV
from prefixtune.generation.prefill import DecodeState, frozen_prefix, left_pad, prefill_decoder
from prefixtune.generation.sampling import ban_repeated_ngrams, invalid_rows
from prefixtune.generation.sampling import pick_tokens as pick_tokens_batch


@dataclass
class Row:
    """One request decoding in the running batch."""

    prompt: list[int]
    config: GenerateConfig
    tag: Any = None  # the caller's handle (e.g. the request), returned with the result
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    stop: str = ""  # "eos", "length" or "error" once finished
    error: str = ""  # why the row failed (stop == "error")

    @property
    def remaining(self) -> int:
        return self.config.max_new_tokens - len(self.tokens)


def _pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    """Left-pad `t` with zeros along `dim` to `width` entries."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


def _with_room(mask: Tensor, room: int) -> Tensor:
    """(R, S) key mask in use -> (R, S + room) buffer (future tokens visible)."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], room)], dim=1)


class RunningBatch:
    """The rows currently decoding, their shared KV cache and their next-token logits."""

    def __init__(self, model: PreTrainedModel, eos_ids: list[int]) -> None:
        self.model = model
        self.eos = set(eos_ids)
        self.rows: list[Row] = []
        self.state: DecodeState | None = None
        self.logits: Tensor | None = None  # (R, V) next-token logits of every running row

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ joining
    def add(self, rows: list[Row], prefix: PrefixKV | None, pad_token_id: int) -> None:
        """Prefill `rows` (row i uses prefix row i) and merge them into the running batch."""
        if not rows:
            return
        device = self.model.device
        ids, mask = left_pad([r.prompt for r in rows], pad_token_id)
        if prefix is not None:
            prefix = frozen_prefix(prefix, self.model.dtype, device)
        room = max(r.config.max_new_tokens for r in rows)
        state, logits = prefill_decoder(
            self.model, ids.to(device), mask.to(device), prefix, room,
            prefix_in_cache=True if prefix is not None else None,
        )  # fmt: skip
        for row in rows:
            if row.config.do_sample:
                row.generator = torch.Generator(device=device).manual_seed(row.config.seed)
        if self.state is None:
            self.state, self.logits, self.rows = state, logits, list(rows)
        else:
            self._merge(state, logits, rows)

    def _merge(self, other: DecodeState, logits: Tensor, rows: list[Row]) -> None:
        """Concatenate `other` below the running rows, aligning key columns on the right."""
        mine = self.state
        width = max(mine.length, other.length)
        for a, b in zip(mine.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)])
            a.values = torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)])
        masks = [_pad_left(s.mask[:, : s.length], width, 1) for s in (mine, other)]
        self.rows = self.rows + rows
        mine.mask = _with_room(torch.cat(masks), self._room())  # (R, width + room)
        mine.length = width
        mine.positions = torch.cat([mine.positions, other.positions])
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])

    def _room(self) -> int:
        return max((r.remaining for r in self.rows), default=0)

    # ------------------------------------------------------------------ decoding
    def pick(self) -> Tensor:
        """Next token of every row (R,) from the current logits, by each row's options.

        A row whose logits are not finite, or whose choice raises, gets stop "error" (its
        token is then meaningless); the other rows are not affected."""
        logits = self.logits
        tokens = logits.argmax(-1)
        for i in invalid_rows(logits).nonzero().squeeze(1).tolist():
            self._fail_row(self.rows[i], "the model produced non-finite logits (NaN or inf) "
                           "for this request; its prefix may hold non-finite values")  # fmt: skip
        for i, row in enumerate(self.rows):
            config = row.config
            if row.stop or not (config.do_sample or config.no_repeat_ngram_size):
                continue
            try:
                tokens[i] = self._pick_row(logits[i : i + 1], row)
            except Exception as err:  # one row's options must not end the batch
                self._fail_row(row, f"choosing the next token failed: {err}")
        return tokens

    @staticmethod
    def _pick_row(scores: Tensor, row: Row) -> int:
        """The next token of one row from its logits (1, V), n-grams banned, maybe sampled."""
        config = row.config
        if config.no_repeat_ngram_size:
            history = torch.tensor([row.tokens], dtype=torch.long, device=scores.device)
            scores = ban_repeated_ngrams(scores.float(), history, config.no_repeat_ngram_size)
        return int(pick_tokens_batch(scores, config, row.generator)[0])

    @staticmethod
    def _fail_row(row: Row, message: str) -> None:
        row.stop, row.error = "error", message

    def step(self) -> list[Row]:
        """Choose one token per row, retire finished rows, feed the rest; returns the finished."""
        if not self.rows:
            return []
        tokens = self.pick()
        finished, keep = [], []
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            if row.stop:  # failed while picking
                pass
            elif token in self.eos:
                row.stop = "eos"
            else:
                row.tokens.append(token)
                if row.remaining == 0:
                    row.stop = "length"
            (finished if row.stop else keep).append((i, row))
        if finished:
            self._retire([i for i, _ in keep])
            tokens = tokens[[i for i, _ in keep]]
        if self.rows:
            self.logits = self.state.step(tokens)
        return [row for _, row in finished]

    def remove(self, rows: list[Row]) -> None:
        """Take `rows` out of the batch between steps (e.g. cancelled requests)."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        logits = self.logits
        self._retire(keep)
        if self.rows:
            self.logits = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]

    def _retire(self, keep: list[int]) -> None:
        """Keep only rows `keep`; drop key columns that no remaining row can see."""
        if not keep:
            self.rows, self.state, self.logits = [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.logits.device)
        self.state.select(index)
        self.rows = [self.rows[i] for i in keep]
        self._compact()

    def _compact(self) -> None:
        """Cut leading key columns masked in every row (left padding of departed rows)."""
        state = self.state
        used = state.mask[:, : state.length].any(0)  # (S,)
        first = int(used.nonzero()[0]) if bool(used.any()) else 0
        if first == 0:
            return
        for layer in state.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        state.mask = state.mask[:, first:]
        state.length -= first
