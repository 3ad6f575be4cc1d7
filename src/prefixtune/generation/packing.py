"""Packed prefill: a batch of left-padded prompts run as one unpadded sequence.

Prompts of different lengths padded to the longest waste the padding's share of every matmul.
Here the real tokens of all rows are concatenated into one sequence (1, S); a block-diagonal
causal mask keeps rows apart, each row's tokens also see their own prefix, whose keys/values
are seeded once per distinct prefix in front of the sequence. The resulting keys/values are
then gathered into the usual per-row layout ([prefix | left-padded prompt]), so decoding goes on
exactly as after a padded prefill. Packing trades padded linear work for a larger (masked)
attention over S keys: `packing_pays` picks it only when that trade wins.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from prefixtune.core.attention import ATTN_NAME, PrefixKV
from prefixtune.core.models import accepts_argument
from prefixtune.generation.kvcache import cache_kwargs

PACKABLE_ATTENTION = (ATTN_NAME, "sdpa")  # take a boolean 4D mask as it is
ALIBI_MODELS = ("bloom", "mpt")  # build their position bias from a 2D mask


def packing_pays(model: PreTrainedModel, attention_mask: Tensor, prefix: PrefixKV | None) -> bool:
    """True when one packed sequence can stand for the left-padded (B, T) batch and costs
    fewer FLOPs.

    Linear layers cost ~2 x (non-embedding parameters) per token; attention ~4 x hidden x
    layers per (query, key) pair, and a packed sequence attends over all S = sum(lengths) keys
    plus every distinct prefix. Models that build ALiBi from a 2D mask, attention that does not
    take a boolean 4D mask, and masks with holes inside a prompt are never packed.
    """
    config = model.config
    if config._attn_implementation not in PACKABLE_ATTENTION or _alibi(config):
        return False
    lengths, width = attention_mask.sum(-1), attention_mask.shape[1]
    if int(lengths.min()) == width or not _left_padded(attention_mask, lengths):
        return False
    prefix_length, distinct = _prefix_size(prefix)
    hidden = config.hidden_size
    linear = 2 * (model.num_parameters() - config.vocab_size * hidden)
    pair = 4 * hidden * config.num_hidden_layers
    batch, packed = len(lengths), int(lengths.sum())
    padded_cost = batch * width * (linear + pair * (width + prefix_length))
    packed_cost = packed * (linear + pair * (packed + distinct * prefix_length))
    return packed_cost < padded_cost


def _alibi(config) -> bool:
    return config.model_type in ALIBI_MODELS or bool(getattr(config, "alibi", False))


def _left_padded(attention_mask: Tensor, lengths: Tensor) -> bool:
    """Each row's real tokens are one run ending at the last column (no holes)."""
    column = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    expected = column[None, :] >= attention_mask.shape[1] - lengths[:, None]  # (B, T)
    return bool(torch.equal(attention_mask.bool(), expected))


def _prefix_size(prefix: PrefixKV | None) -> tuple[int, int]:
    """(positions per prefix, distinct prefixes the rows use)."""
    if prefix is None:
        return 0, 0
    length = max(t.shape[-2] for t in prefix.kv.values())
    if prefix.rows is None:  # one prefix for every row, or row i's prefix at index i
        return length, prefix.kv["self"].shape[0]
    return length, int(prefix.rows.unique().numel())


def packed_prefill(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: PrefixKV | None,
    cache: Cache,
) -> tuple[Tensor, Tensor]:
    """Prefill left-padded prompts (B, T) as one sequence; writes `cache` in the seeded layout.

    Returns the (B, P + T) bool key mask (prefix columns first) and last-token logits (B, V).
    """
    real = attention_mask.bool()
    lengths = real.sum(-1)  # (B,)
    kv, prefix_valid, used = _distinct_prefixes(prefix, len(input_ids), input_ids.device)
    scratch = DynamicCache(config=model.config)
    for layer in range(0 if kv is None else kv.shape[1]):
        # (U, 2, H_kv, P, D) -> (1, H_kv, U * P, D): every distinct prefix, one after another
        keys, values = (kv[:, layer, i].transpose(0, 1).flatten(1, 2)[None] for i in (0, 1))
        scratch.update(keys.to(model.dtype), values.to(model.dtype), layer)
    prefix_length = 0 if kv is None else kv.shape[-2]
    positions = real.long().cumsum(-1) - 1 + prefix_valid.sum(-1, keepdim=True)  # (B, T)
    ends = lengths.cumsum(0) - 1  # (B,) index of each row's last token in the sequence
    keep = accepts_argument(model, "logits_to_keep")
    out = model(
        input_ids=input_ids[real][None],  # (1, S): row 0's tokens, then row 1's, ...
        attention_mask=_packed_mask(lengths, used, prefix_valid, prefix_length),
        position_ids=positions[real][None],
        **cache_kwargs(model, scratch),
        use_cache=True,
        **({"logits_to_keep": ends} if keep else {}),
    )
    logits = out.logits[0] if keep else out.logits[0, ends]  # (B, V)
    index = _unpack_index(lengths, used, prefix_length, input_ids.shape[1])  # (B, P + T)
    for layer, state in enumerate(scratch.layers):
        # (1, H_kv, U*P + S, D) -> (B, H_kv, P + T, D), each row's prefix then its prompt
        keys, values = (t[0][:, index].transpose(0, 1) for t in (state.keys, state.values))
        cache.update(keys, values, layer)
    return torch.cat([prefix_valid, real], dim=1), logits


def _distinct_prefixes(
    prefix: PrefixKV | None, batch: int, device: torch.device
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The prefixes rows use, each once: kv (U, L, 2, H_kv, P, D) or None, the rows' (B, P)
    valid mask and (B,) index of each row's prefix among the U."""
    used = torch.zeros(batch, dtype=torch.long, device=device)
    if prefix is None:
        return None, torch.ones(batch, 0, dtype=torch.bool, device=device), used
    kv, valid = prefix.kv["self"], prefix.valid
    if prefix.rows is None and kv.shape[0] > 1:  # row i's prefix at index i
        used = torch.arange(batch, device=device)
    elif prefix.rows is not None:
        distinct, used = torch.unique(prefix.rows.to(device), return_inverse=True)
        kv = kv.index_select(0, distinct.to(kv.device))
        valid = None if valid is None else valid.to(device)[distinct]
    if valid is None:
        valid = torch.ones(kv.shape[0], kv.shape[-2], dtype=torch.bool, device=device)
    return kv, valid.to(device)[used].bool(), used


def _packed_mask(lengths: Tensor, used: Tensor, valid: Tensor, prefix_length: int) -> Tensor:
    """(1, 1, S, U*P + S) bool: a token sees its row's valid prefix columns and, causally, its
    own row's earlier tokens."""
    device = lengths.device
    row = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # (S,)
    order = torch.arange(len(row), device=device)
    tokens = (row[:, None] == row[None, :]) & (order[None, :] <= order[:, None])  # (S, S)
    distinct = int(used.max()) + 1 if prefix_length else 0
    owner = torch.arange(distinct * prefix_length, device=device) // max(prefix_length, 1)
    slot = torch.arange(distinct * prefix_length, device=device) % max(prefix_length, 1)
    prefix_cols = (used[row][:, None] == owner[None, :]) & valid[row][:, slot]  # (S, U*P)
    return torch.cat([prefix_cols, tokens], dim=1)[None, None]


def _unpack_index(lengths: Tensor, used: Tensor, prefix_length: int, width: int) -> Tensor:
    """(B, P + T) positions in the packed keys of each row's [prefix | left-padded prompt].

    Padding columns point at position 0 (masked out anyway)."""
    device = lengths.device
    distinct = int(used.max()) + 1 if prefix_length else 0
    prefix_cols = used[:, None] * prefix_length + torch.arange(prefix_length, device=device)
    starts = distinct * prefix_length + lengths.cumsum(0) - lengths  # (B,) first token of row
    column = torch.arange(width, device=device)[None, :]  # (1, T)
    pad = width - lengths[:, None]  # (B, 1) left padding per row
    prompt_cols = (starts[:, None] + column - pad).clamp(min=0)  # (B, T)
    return torch.cat([prefix_cols, prompt_cols], dim=1)
