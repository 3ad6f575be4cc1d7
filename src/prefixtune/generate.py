"""Generation engine: token ids in, token ids out (no tokenizer inside).

One prefill, then incremental decoding with the model's KV cache. Each row may carry its own
prefix (`PrefixKV.rows`); prefixes either ride along through the registered attention function
(concatenated in front of the cached keys on every call) or, for decoder-only models without
sliding-window layers, are written into the cache once before the prompt ("seeded"), which
gives the same numbers with less work per step. Finished rows leave the batch (their cache rows
are dropped), so the batch only ever holds rows that still decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from .attention import ATTN_NAME, PrefixKV, enable_prefixes, position_ids_for
from .config import ConfigError, GenerateConfig
from .kvcache import plain_attention_layers, preallocated_cache
from .limits import check_rows, position_limit
from .models import accepts_argument, compiled_for_decoding, is_encoder_decoder
from .packing import packed_prefill, packing_pays


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
                past_key_values=self.cache,
                use_cache=True,
                **extra,
            )
        else:
            self.length += 1
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.mask[:, : self.length],
                position_ids=self.positions[:, None],
                past_key_values=self.cache,
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


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), both (B, T) long."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


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


def full_attention_decoder(model: PreTrainedModel, cache: Cache) -> bool:
    """A decoder-only model whose cache layers all keep every position of plain attention."""
    return not is_encoder_decoder(model) and plain_attention_layers(cache)


def seed_cache(cache: Cache, prefix: PrefixKV, batch: int, dtype: torch.dtype) -> Tensor:
    """Write each row's prefix keys/values into the cache; returns the (B, P) bool key mask."""
    kv = prefix.kv["self"]  # (N, L, 2, H_kv, P, D)
    rows = prefix.rows
    if rows is None:
        rows = torch.zeros(batch, dtype=torch.long, device=kv.device)
    kv = kv.index_select(0, rows)  # (B, L, 2, H_kv, P, D)
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
        past_key_values=cache,
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


def ban_repeated_ngrams(scores: Tensor, history: Tensor, size: int) -> Tensor:
    """Set to -inf (in place) every token that would repeat an n-gram of `history` (R, L).

    Vectorised over rows: compare the last size-1 tokens with every earlier (size-1)-gram.
    """
    rows, length = history.shape
    if size < 1 or length < size:
        return scores
    grams = history.unfold(1, size, 1)  # (R, L-n+1, n)
    tail = history[:, length - size + 1 :]  # (R, n-1)
    hit = (grams[:, :, :-1] == tail[:, None, :]).all(-1)  # (R, L-n+1)
    vocab = scores.shape[-1]
    target = torch.where(hit, grams[:, :, -1], vocab)  # misses go to a spare column
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, target, True)
    return scores.masked_fill_(banned[:, :vocab], float("-inf"))


MIN_TEMPERATURE = 1e-4
"""Sampling below this temperature is greedy decoding (its limit); logits / T would overflow."""


def pick_tokens(
    logits: Tensor, config: GenerateConfig, generator: torch.Generator | None
) -> Tensor:
    """Greedy argmax, or a sample after temperature and nucleus (top-p) filtering: (R, V) -> (R,).

    Robust per row: a temperature under MIN_TEMPERATURE is greedy, the most likely token always
    survives top-p, and a row whose logits give no valid distribution (NaN, +inf, all -inf)
    falls back to its argmax instead of failing the other rows' draw.
    """
    if not config.do_sample or config.temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    probs = sampling_probs(logits, config)  # (R, V)
    valid = invalid_rows(probs).logical_not()  # (R,)
    tokens = logits.argmax(-1)
    if bool(valid.all()):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if bool(valid.any()):
        tokens[valid] = torch.multinomial(probs[valid], 1, generator=generator).squeeze(1)
    return tokens


def sampling_probs(logits: Tensor, config: GenerateConfig) -> Tensor:
    """softmax(logits / temperature) cut to the top-p nucleus, fp32 (R, V); the most likely
    token is always kept. Logits are shifted by their row maximum first, so no finite row
    overflows whatever the temperature."""
    scores = logits.float()
    scores = (scores - scores.amax(-1, keepdim=True)) / config.temperature
    probs = torch.softmax(scores, dim=-1)  # (R, V)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        cut = before >= config.top_p
        cut[:, 0] = False  # a top_p below fp32 resolution still keeps the top token
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs


def invalid_rows(scores: Tensor) -> Tensor:
    """(R,) bool: rows of logits or probabilities (R, V) holding NaN or +inf, or no finite
    value at all (every token -inf): rows no token can be chosen from."""
    return scores.isnan().any(-1) | scores.isposinf().any(-1) | ~(scores > float("-inf")).any(-1)


def decode_rows(
    state: DecodeState,
    logits: Tensor,
    config: GenerateConfig,
    eos: Tensor,
    history: Tensor,
) -> list[list[int]]:
    """Greedy or sampled decoding; finished rows leave the batch.

    history: (B, h) tokens that count for n-gram blocking before the first new token.
    """
    batch, skip = history.shape
    ids = torch.arange(batch, device=logits.device)  # original row of each running row
    results: list[list[int]] = [[] for _ in range(batch)]
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=logits.device).manual_seed(config.seed)
    seqs = history
    for step in range(config.max_new_tokens):
        if config.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits.float(), seqs, config.no_repeat_ngram_size)
        tokens = pick_tokens(logits, config, generator)  # (R,)
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)  # (R, h + step + 1)
        ended = torch.isin(tokens, eos)
        last = step + 1 == config.max_new_tokens
        if last or bool(ended.any()):
            finished = ended | last
            cut = ended[finished].tolist()
            for i, row, eos_end in zip(
                ids[finished].tolist(), seqs[finished, skip:].tolist(), cut, strict=True
            ):
                results[i] = row[:-1] if eos_end else row
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            ids, seqs, tokens = ids[keep], seqs[keep], tokens[keep]
            state.select(keep)
        logits = state.step(tokens)
    return results


def _check_inputs(
    input_ids: Tensor, attention_mask: Tensor, prefix: PrefixKV | None, enc_dec: bool
):
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    empty = (attention_mask == 0).all(1).nonzero().flatten().tolist()  # rows without a token
    if empty:
        more = f", and so are {len(empty) - 1} more rows" if len(empty) > 1 else ""
        raise ValueError(
            f"row {empty[0]} of the batch is empty (no token with attention_mask 1){more}: "
            "every prompt needs at least one token"
        )
    if not enc_dec and not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "decoder-only prompts must be left-padded with a real last token in every row "
            "(build them with prefixtune.generate.left_pad)"
        )
    if prefix is None:
        return
    for name in ("rows", "visible_from"):
        value = getattr(prefix, name)
        if value is not None and value.shape[0] != len(input_ids):
            raise ValueError(
                f"prefix.{name} has {value.shape[0]} entries for {len(input_ids)} rows"
            )
    visible = prefix.visible_from
    if visible is not None and (enc_dec or bool((visible > input_ids.shape[1]).any())):
        raise ValueError(
            "an infix (prefix.visible_from) must start within or right after a decoder-only prompt"
        )


def generate(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: PrefixKV | None,
    config: GenerateConfig,
    *,
    eos_token_id: int | list[int],
    pad_token_id: int,
    prefix_in_cache: bool | None = None,
) -> list[list[int]]:
    """Generate continuations; per input row the new ids (no prompt, no EOS, no padding).

    input_ids/attention_mask (B, T): left-padded prompts for decoder-only models; encoder inputs
    (either padding side) for encoder-decoder models, whose decoding starts from
    `decoder_start_token_id`. prefix: one PrefixKV for the batch (rows may select different
    prefixes), e.g. a PrefixEncoder output or `FoldedPrefix.to_prefix_kv()`. prefix_in_cache:
    None picks seeding where possible, False forces concatenation in attention, True insists.
    `pad_token_id` fills unused beam slots; outputs never contain padding. With
    `config.compile` prefill and decoding run the model under torch.compile (same tokens).
    """
    from .beam import beam_search  # beam.py uses this module's helpers

    enc_dec = is_encoder_decoder(model)
    _check_inputs(input_ids, attention_mask, prefix, enc_dec)
    if config.do_sample and config.num_beams > 1:
        raise ConfigError("sampling with num_beams > 1 is not supported; set num_beams=1")
    if prefix_in_cache and enc_dec:
        raise ValueError("prefix_in_cache=True is for decoder-only models")
    if len(input_ids) == 0:
        return []
    if not enc_dec:  # real tokens take positions after the prefix
        offsets = None if prefix is None else prefix.row_lengths(len(input_ids), input_ids.device)
        check_rows(position_limit(model), attention_mask.sum(1), offsets,
                   new_tokens=config.max_new_tokens,
                   hint="shorten the prompt (--max-source-tokens) or lower --max-new-tokens")  # fmt: skip
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    with torch.inference_mode(), eval_mode(model):
        if prefix is not None:
            if model.config._attn_implementation != ATTN_NAME:
                enable_prefixes(model)
            prefix = frozen_prefix(prefix, model.dtype, device)
            if not enc_dec:  # an infix is seen by position ids (sliding layers drop early keys)
                prefix = prefix.with_visible_positions(attention_mask)
        runner = compiled_for_decoding(model) if config.compile else model
        if enc_dec:
            state, logits = prefill_encoder_decoder(
                runner, input_ids, attention_mask, prefix, config.max_new_tokens
            )
            history = start_tokens(model, len(input_ids), device)[:, None]  # (B, 1)
        else:
            state, logits = prefill_decoder(
                runner, input_ids, attention_mask, prefix, config.max_new_tokens, prefix_in_cache
            )
            history = input_ids[:, :0]  # (B, 0): the prompt does not count for n-grams
        if config.num_beams > 1:
            return beam_search(state, logits, config, eos, history, pad_token_id)
        return decode_rows(state, logits, config, eos, history)
