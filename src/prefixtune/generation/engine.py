"""Generation engine: token ids in, token ids out (no tokenizer inside).

One prefill, then incremental decoding with the model's KV cache. Each row may carry its own
prefix (`PrefixKV.rows`); prefixes either ride along through the registered attention function
(concatenated in front of the cached keys on every call) or, for decoder-only models without
sliding-window layers, are written into the cache once before the prompt ("seeded"), which
gives the same numbers with less work per step. Finished rows leave the batch (their cache rows
are dropped), so the batch only ever holds rows that still decode.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, GenerateConfig
from prefixtune.core.attention import ATTN_NAME, PrefixKV
from prefixtune.core.fuse import fuse_projections, fused_groups, unfuse_projections
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.limits import check_rows, position_limit
from prefixtune.core.models import is_encoder_decoder
from prefixtune.core.runtime import compiled_for_decoding
from prefixtune.generation.prefill import (
    DecodeState,
    eval_mode,
    frozen_prefix,
    prefill_decoder,
    prefill_encoder_decoder,
    start_tokens,
)
from prefixtune.generation.sampling import ban_repeated_ngrams, pick_tokens

"""Sampling below this temperature is greedy decoding (its limit); logits / T would overflow."""


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
            "(build them with prefixtune.generation.prefill.left_pad)"
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
    fused_here = config.fuse_projections and not fused_groups(model)
    if fused_here:
        fuse_projections(model)  # before inference mode; undone below (this call fused it)
    try:
        return _decode(model, input_ids, attention_mask, prefix, config, eos_token_id,
                       pad_token_id, prefix_in_cache)  # fmt: skip
    finally:
        if fused_here:  # a later call without the flag runs unfused
            unfuse_projections(model)


def _decode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
            prefix: PrefixKV | None, config: GenerateConfig, eos_token_id: int | list[int],
            pad_token_id: int, prefix_in_cache: bool | None) -> list[list[int]]:  # fmt: skip
    """generate() past its checks: prefill, then greedy/sampled rows or beam search."""
    from prefixtune.generation.beam import beam_search  # beam.py uses this module's helpers

    enc_dec = is_encoder_decoder(model)
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
