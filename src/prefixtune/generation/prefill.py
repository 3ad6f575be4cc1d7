"""Decode state and prefill: a batch of prompts (each row with its own prefix, or none) run once
through the model, leaving the cache and the last logits that decoding steps from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from prefixtune.core.attention import PrefixKV, position_ids_for
from prefixtune.core.models import accepts_argument, is_encoder_decoder
from prefixtune.generation.kvcache import (
    cache_kwargs,
    plain_attention_layers,
    preallocated_cache,
)
from prefixtune.generation.packing import packed_prefill, packing_pays


@dataclass
class DecodeState:
    """What one incremental step needs for the R rows still decoding.

    `select(index)` keeps/reorders rows (dropping finished rows, following beams).
    """

    model: PreTrainedModel
    cache: Cache
    prefix: PrefixKV | None  # passed to attention on every call (None when seeded or absent)
    mask: Tensor | None  # (R, S_max) bool key mask buffer (decoder-only); None for enc-dec
    length: int  # key columns in use (cached tokens, seeded prefix included)
    positions: Tensor | None  # (R,) position id of the next token (decoder-only)
    encoder_hidden: Tensor | None = None  # (R, S_enc, d) encoder output (enc-dec)
    encoder_mask: Tensor | None = None  # (R, S_enc)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (R,); returns next-token logits (R, V) in the model's dtype."""
        extra = {} if self.prefix is None else {"prefix_kv": self.prefix}
        if self.encoder_hidden is not None:
            out = self.model(
                attention_mask=self.encoder_mask,
                encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_hidden),
                decoder_input_ids=tokens[:, None],
                **cache_kwargs(self.model, self.cache),
                use_cache=True,
                **extra,
            )
        else:
            self.length += 1
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.mask[:, : self.length],
                position_ids=self.positions[:, None],
                **cache_kwargs(self.model, self.cache),
                use_cache=True,
                **extra,
            )
            self.positions = self.positions + 1
        return out.logits[:, -1]

    def select(self, index: Tensor) -> None:
        """Row i becomes old row index[i] everywhere (cache, masks, positions, prefix rows)."""
        self.cache.reorder_cache(index)
        if self.mask is not None:
            self.mask = self.mask[index]
            self.positions = self.positions[index]
        if self.encoder_hidden is not None:
            self.encoder_hidden = self.encoder_hidden[index]
            self.encoder_mask = self.encoder_mask[index]
        if self.prefix is not None:
            self.prefix = select_rows(self.prefix, index)


def pad_rows(rows: Sequence[list[int]], value: int, side: str) -> tuple[Tensor, Tensor]:
    """Token id lists padded with `value` on `side` ('left' or 'right') into (ids, mask),
    both (B, T) long; the mask marks each row's own tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def left_pad(rows: Sequence[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), both (B, T) long."""
    return pad_rows(rows, pad_token_id, "left")


def pad_prompts(
    model: PreTrainedModel, prompts: Sequence[list[int]], pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """A batch of prompts as `generate` takes it: left-padded for decoder-only models,
    right-padded encoder inputs for encoder-decoder ones (BART's learned positions ignore the
    attention mask, so its inputs start at position 0 as in training)."""
    return pad_rows(prompts, pad_token_id, "right" if is_encoder_decoder(model) else "left")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode for the duration (gradient-checkpointing layers set
    `training` and would otherwise switch the KV cache off); restores the flags after."""
    training = [m for m in model.modules() if m.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def frozen_prefix(prefix: PrefixKV, dtype: torch.dtype, device: torch.device) -> PrefixKV:
    """Detached copies in the model's dtype/device, computed once (nothing trainable per step)."""
    kv = {kind: t.detach().to(device=device, dtype=dtype) for kind, t in prefix.kv.items()}
    rows, valid, visible = prefix.rows, prefix.valid, prefix.visible_from
    return replace(
        prefix,
        kv=kv,
        rows=None if rows is None else rows.to(device),
        valid=None if valid is None else valid.to(device),
        visible_from=None if visible is None else visible.to(device),
    )


def select_rows(prefix: PrefixKV, index: Tensor) -> PrefixKV:
    """The prefix of rows `index` (per-row fields indexed; a shared prefix stays shared)."""
    if prefix.rows is None and prefix.visible_from is None:
        return prefix
    rows, visible, position = prefix.rows, prefix.visible_from, prefix.visible_position
    return replace(
        prefix,
        rows=None if rows is None else rows[index],
        visible_from=None if visible is None else visible[index],
        visible_position=None if position is None else position[index],
    )


def can_seed_cache(model: PreTrainedModel, prefix: PrefixKV | None, cache: Cache) -> bool:
    """Seeding needs a decoder-only model without sliding windows (they would evict the prefix)."""
    return (
        prefix is not None
        and set(prefix.kv) == {"self"}
        and prefix.visible_from is None
        and full_attention_decoder(model, cache)
    )


def full_attention_decoder(model: PreTrainedModel, cache: Cache | None = None) -> bool:
    """A decoder-only model whose cache layers all keep every position of plain attention: its
    KV cache can hold prefixes (sliding windows would evict them). `cache`: the one to check
    (default: a fresh cache for the model's config)."""
    if is_encoder_decoder(model):
        return False
    return plain_attention_layers(DynamicCache(config=model.config) if cache is None else cache)


def seed_cache(cache: Cache, prefix: PrefixKV, batch: int, dtype: torch.dtype) -> Tensor:
    """Write each row's prefix keys/values into the cache; returns the (B, P) bool key mask."""
    kv = prefix.kv["self"]  # (N, L, 2, H_kv, P, D)
    rows = prefix.rows
    if rows is None:  # one prefix for every row (N == 1), or row i's at index i (N == B)
        shared = kv.shape[0] == 1
        rows = torch.zeros(batch, dtype=torch.long, device=kv.device) if shared else None
    kv = kv if rows is None else kv.index_select(0, rows)  # (B, L, 2, H_kv, P, D)
    for layer in range(kv.shape[1]):
        cache.update(kv[:, layer, 0].to(dtype), kv[:, layer, 1].to(dtype), layer)
    if prefix.valid is None:
        return torch.ones(batch, kv.shape[-2], dtype=torch.bool, device=kv.device)
    valid = prefix.valid if prefix.rows is None else prefix.valid[prefix.rows]
    return valid.expand(batch, -1).bool()


def prompt_positions(mask: Tensor, prefix: PrefixKV | None) -> tuple[Tensor, Tensor]:
    """Prompt position ids (B, T) and the first new token's position (B,).

    Real tokens count from 0, shifted by the row's prefix length; with an infix
    (`visible_from`) only tokens from that index on are shifted, new tokens always are.
    """
    real = mask.long().cumsum(-1)  # (B, T) real tokens up to and including each index
    if prefix is None:
        offset = torch.zeros_like(real[:, -1])
        return position_ids_for(mask, offset), real[:, -1]
    lengths = prefix.row_lengths(mask.shape[0], mask.device)  # (B,)
    if prefix.visible_from is None:
        return position_ids_for(mask, lengths), real[:, -1] + lengths
    index = torch.arange(mask.shape[1], device=mask.device)
    shifted = index[None, :] >= prefix.visible_from[:, None]  # (B, T)
    positions = real - 1 + lengths[:, None] * shifted
    return positions.masked_fill(mask == 0, 0), real[:, -1] + lengths


def prefill_decoder(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: PrefixKV | None,
    max_new_tokens: int,
    prefix_in_cache: bool | None,
) -> tuple[DecodeState, Tensor]:
    """Run the left-padded prompt once; returns the state and last-position logits (B, V)."""
    batch, device = input_ids.shape[0], input_ids.device
    prefix_length = 0 if prefix is None else max(t.shape[-2] for t in prefix.kv.values())
    cache = preallocated_cache(model.config, prefix_length + input_ids.shape[1] + max_new_tokens)
    positions, next_position = prompt_positions(attention_mask, prefix)
    seedable = can_seed_cache(model, prefix, cache)
    if prefix_in_cache and not seedable:
        raise ValueError(
            "prefix_in_cache=True needs a decoder-only model without sliding-window layers "
            "and 'self' prefixes only"
        )
    seeded = seedable and prefix_in_cache is not False
    room = torch.ones(batch, max_new_tokens, dtype=torch.bool, device=device)
    if (seeded or (prefix is None and full_attention_decoder(model, cache))) and packing_pays(
        model, attention_mask, prefix
    ):
        keys, logits = packed_prefill(model, input_ids, attention_mask, prefix, cache)
        mask = torch.cat([keys, room], dim=1)  # (B, P + T + max_new)
        return DecodeState(model, cache, None, mask, keys.shape[1], next_position), logits
    keys = [attention_mask.bool()]
    if seeded:
        keys.insert(0, seed_cache(cache, prefix, batch, model.dtype))
        prefix = None
    mask = torch.cat([*keys, room], dim=1)  # (B, [P +] T + max_new)
    length = mask.shape[1] - max_new_tokens
    extra = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    if prefix is not None:
        extra["prefix_kv"] = prefix
    out = model(
        input_ids=input_ids,
        attention_mask=mask[:, :length],
        position_ids=positions,
        **cache_kwargs(model, cache),
        use_cache=True,
        **extra,
    )
    state = DecodeState(model, cache, prefix, mask, length, next_position)
    return state, out.logits[:, -1]


def prefill_encoder_decoder(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: PrefixKV | None,
    max_new_tokens: int,
) -> tuple[DecodeState, Tensor]:
    """Encode once, then feed the decoder start token; returns the state and logits (B, V)."""
    extra = {} if prefix is None else {"prefix_kv": prefix}
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, **extra)
    cache = EncoderDecoderCache(
        preallocated_cache(model.config, max_new_tokens + 1), DynamicCache(config=model.config)
    )
    state = DecodeState(
        model, cache, prefix, None, 0, None, hidden.last_hidden_state, attention_mask
    )
    return state, state.step(start_tokens(model, input_ids.shape[0], input_ids.device))


def start_tokens(model: PreTrainedModel, batch: int, device: torch.device) -> Tensor:
    """(B,) decoder start tokens of an encoder-decoder model."""
    start = model.config.decoder_start_token_id
    if start is None:
        raise ValueError(f"{type(model).__name__}: config has no decoder_start_token_id")
    return torch.full((batch,), start, dtype=torch.long, device=device)
