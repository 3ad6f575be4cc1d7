"""The one place prefix keys/values meet attention.

A registered `transformers` attention function ("prefixtune") receives each layer's rotated
query/key/value (B, H, T, D) / (B, H_kv, S, D) and, when the forward call carries a
`prefix_kv=PrefixKV(...)` keyword, concatenates that row's prefix keys/values and mask columns
in front of the real keys before calling SDPA. Prefix keys get no rotary embedding (they live in
the rotated space), and nothing about the prefix enters the KV cache, so one batch can mix
prefixes and the cache holds real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefixtune.core.math_attention import math_attention
from prefixtune.core.softcap_attention import softcapped_attention

ATTN_NAME = "prefixtune"
SITE_ATTR = "_prefixtune_site"


@dataclass(frozen=True)
class Site:
    """Where an attention module sits: its kind ('self', 'encoder', 'decoder', 'cross') and layer."""

    kind: str
    layer: int


@dataclass
class PrefixKV:
    """Prefix keys/values for one forward pass, per attention kind.

    kv[kind]: (N, L, 2, H_kv, P, D), a stack of N prefixes (index 0 = keys, 1 = values).
    rows:     (B,) long index into the stack, or None when every row uses prefix 0.
    valid:    (N, P) bool, True where a prefix position is real (shorter prefixes are
              right-padded), or None when all positions are real.
    visible_from: (B,) long or None. When set, only queries at sequence index >= visible_from
              see these keys/values (an infix [x; INFIX; y]: y sees it, x does not). Indices
              count the padded sequence including any cached tokens.
    visible_position: (B,) long or None: with `visible_from`, the position id of the first
              query that sees the keys/values (`with_visible_positions` computes it). Attention
              calls that carry position ids then decide by those: a sliding-window cache keeps
              only the window's keys, so there a query's index is not its index in the sequence.
    """

    kv: dict[str, Tensor]
    rows: Tensor | None = None
    valid: Tensor | None = None
    visible_from: Tensor | None = None
    visible_position: Tensor | None = None

    def layer(self, site: Site, batch: int) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """This layer's (keys, values, valid) for a batch of B rows, or None if no prefix here."""
        stack = self.kv.get(site.kind)
        if stack is None:
            return None
        per_layer = stack[:, site.layer]  # (N, 2, H_kv, P, D)
        valid = self.valid
        if self.rows is None:
            per_layer = per_layer.expand(batch, *per_layer.shape[1:])  # (B, 2, H_kv, P, D)
            valid = None if valid is None else valid.expand(batch, -1)
        else:
            per_layer = per_layer.index_select(0, self.rows)
            valid = None if valid is None else valid.index_select(0, self.rows)
        return per_layer[:, 0], per_layer[:, 1], valid

    @classmethod
    def stack(cls, prefixes: list[dict[str, Tensor]], rows: Tensor | None = None) -> PrefixKV:
        """Stack N prefixes (kind -> (L, 2, H_kv, P_i, D)) of possibly different lengths.

        Shorter prefixes are right-padded with zeros and masked out by `valid`.
        """
        kinds = set(prefixes[0])
        if any(set(p) != kinds for p in prefixes):
            raise ValueError("prefixes in one batch must cover the same attention kinds")
        lengths = [next(iter(p.values())).shape[-2] for p in prefixes]
        longest = max(lengths)
        kv = {}
        for kind in prefixes[0]:
            padded = [F.pad(p[kind], (0, 0, 0, longest - p[kind].shape[-2])) for p in prefixes]
            kv[kind] = torch.stack(padded)  # (N, L, 2, H_kv, P, D)
        valid = None
        if min(lengths) < longest:
            positions = torch.arange(longest)[None, :]  # (1, P)
            valid = positions < torch.tensor(lengths)[:, None]  # (N, P)
            valid = valid.to(next(iter(kv.values())).device)
        return cls(kv, rows, valid)

    def query_visibility(
        self, t_len: int, s_len: int, position_ids: Tensor | None = None
    ) -> Tensor | None:
        """(B, 1, T, 1) bool: which queries may see the prefix (None: all of them).

        By position id where `visible_position` is set and the call's (B or 1, T) position ids
        are at hand (right in sliding-window layers too); else by index, numbering the T queries
        as the last of the S keys (right while the cache holds every key).
        """
        if self.visible_from is None:
            return None
        usable = position_ids is not None and position_ids.dim() == 2
        if self.visible_position is not None and usable and position_ids.shape[-1] == t_len:
            threshold = self.visible_position
            seen = position_ids.to(threshold.device) >= threshold[:, None]  # (B, T)
        else:
            index = torch.arange(s_len - t_len, s_len, device=self.visible_from.device)  # (T,)
            seen = index[None, :] >= self.visible_from[:, None]  # (B, T)
        return seen[:, None, :, None]

    def with_visible_positions(self, attention_mask: Tensor) -> PrefixKV:
        """This infix with `visible_position` set for (B, T) prompts: the position id of the
        token at `visible_from` (real tokens before it, plus the row's prefix length), which
        every later token, generated ones included, reaches or passes. No infix: unchanged."""
        if self.visible_from is None:
            return self
        mask = attention_mask.long()
        device = mask.device
        start = self.visible_from.to(device).clamp(max=mask.shape[1])[:, None]  # (B, 1)
        before = torch.arange(mask.shape[1], device=device)[None, :] < start  # (B, T)
        real_before = (mask * before).sum(-1)  # (B,)
        position = real_before + self.row_lengths(mask.shape[0], device)
        return replace(self, visible_position=position.to(self.visible_from.device))

    def row_lengths(self, batch: int, device: torch.device) -> Tensor:
        """(B,) number of real prefix positions per row (the position offset of real tokens)."""
        if self.valid is None:
            length = next(iter(self.kv.values())).shape[-2] if self.kv else 0
            return torch.full((batch,), length, dtype=torch.long, device=device)
        lengths = self.valid.sum(-1).to(device)
        return lengths.expand(batch) if self.rows is None else lengths[self.rows.to(device)]


@dataclass
class KVCapture:
    """Passed as `prefix_kv` to record every layer's (keys, values) instead of adding a prefix."""

    records: dict[Site, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _extend_mask(
    mask: Tensor | None,
    valid: Tensor | None,
    query: Tensor,
    key: Tensor,
    p_len: int,
    causal: bool,
    visible: Tensor | None = None,
) -> Tensor | None:
    """Boolean mask (B, 1, T, P+S) with the prefix columns first; None when nothing is masked.

    mask: the model's (B or 1, 1, T, S) mask over the real keys (bool, additive float or None);
    valid: (B, P) real prefix positions or None (all real); visible: (B, 1, T, 1) queries that
    may see the prefix, or None (all).
    """
    t_len, s_len = query.shape[2], key.shape[2]
    if mask is None:
        causal = causal and t_len > 1
        if not causal and valid is None and visible is None:
            return None
        mask = torch.ones(1, 1, t_len, s_len, dtype=torch.bool, device=query.device)
        if causal:  # bottom-right aligned: query i sees keys up to i + (S - T)
            mask = torch.tril(mask, diagonal=s_len - t_len)
    elif mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 where visible
    if valid is None:
        cols = torch.ones(1, 1, 1, p_len, dtype=torch.bool, device=mask.device)
    else:
        cols = valid[:, None, None, :].to(mask.device)  # (B, 1, 1, P)
    if visible is not None:
        cols = cols & visible.to(cols.device)  # (B, 1, T, P)
    batch = max(mask.shape[0], cols.shape[0])
    cols = cols.expand(batch, 1, t_len, p_len)
    return torch.cat([cols, mask.expand(batch, 1, t_len, s_len)], dim=-1)


def prefix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    prefix_kv: PrefixKV | KVCapture | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """SDPA attention with each row's prefix keys/values placed before the real ones."""
    site = getattr(module, SITE_ATTR, None)
    kwargs.pop("sliding_window", None)  # the sliding window is already in the mask
    if site is not None and isinstance(prefix_kv, KVCapture):
        prefix_kv.records[site] = (key, value)
    elif site is not None and prefix_kv is not None:
        layer = prefix_kv.layer(site, key.shape[0])
        if layer is not None:
            p_key, p_value, valid = layer  # (B, H_kv, P, D) each; valid (B, P) or None
            causal = bool(getattr(module, "is_causal", False))
            visible = prefix_kv.query_visibility(
                query.shape[2], key.shape[2], kwargs.get("position_ids")
            )
            attention_mask = _extend_mask(
                attention_mask, valid, query, key, p_key.shape[2], causal, visible
            )
            key = torch.cat([p_key.to(key.dtype), key], dim=2)  # (B, H_kv, P+S, D)
            value = torch.cat([p_value.to(value.dtype), value], dim=2)
    return attend(module, query, key, value, attention_mask, kwargs)


def attend(module, query, key, value, attention_mask, kwargs: dict,
           kernel: str | None = None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Attention by the kernel that is fastest for this call -> ((B, T, H, D) output, None).

    kernel: "math" (`math_attention`, where it applies) or "sdpa" (PyTorch's SDPA kernels);
    None chooses by the measured limits below."""
    kernel_dtype = _kernel_dtype(query)
    kernel = kernel or _fastest_kernel(kernel_dtype, key)
    if kernel == "sdpa" or not _math_applies(module, query, key, value, attention_mask, kwargs):
        return _sdpa(module, query, key, value, attention_mask, kwargs)
    query, key, value = (t.to(kernel_dtype) for t in (query, key, value))
    with torch.autocast(query.device.type, enabled=False):
        out = math_attention(query, key, value, attention_mask, kwargs.get("scaling"))
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)


def _sdpa(module, query, key, value, attention_mask, kwargs) -> tuple[Tensor, Tensor | None]:
    if kwargs.get("softcap") is not None:  # SDPA has no soft-capping: eager, as the family does
        return softcapped_attention(module, query, key, value, attention_mask, **kwargs)
    if _native_gqa(module, query, attention_mask, kwargs):
        return _gqa_attention(query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _kernel_dtype(query: Tensor) -> torch.dtype:
    """The dtype attention will compute in: autocast's where it is on (RoPE hands fp32 queries)."""
    device = query.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


# PyTorch's CPU flash-attention backward in bf16 costs about as much for 40 keys as for 300 (it
# took 26% of a SmolLM2 training step for 5% of its FLOPs), so over few keys a bf16 training step
# runs attention as two bf16 matmuls around an fp32 softmax (`math_attention`) instead: forward +
# backward 2.9x PyTorch's bf16 kernel at 74 keys, 1.4x at 138, 1.02-1.04x at 264-328 keys for
# B x T = 1,024 queries, 0.94x at 266 keys in rows of 256, slower from ~450 (2 threads, AMX Xeon,
# torch 2.13; `prefixtune bench --suite kernels`, docs/results/bench/amx-kernels.json). In fp32
# PyTorch's kernel is as fast or faster at every length but 138 keys, so fp32 keeps it.
MATH_MAX_KEYS = {torch.bfloat16: 352}


def _fastest_kernel(kernel_dtype: torch.dtype, key: Tensor) -> str:
    """ "math" within its measured key limit for the dtype attention computes in, else "sdpa"."""
    return "math" if key.shape[2] <= MATH_MAX_KEYS.get(kernel_dtype, 0) else "sdpa"


def _math_applies(module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                  kwargs: dict) -> bool:  # fmt: skip
    """True for a CPU training call that `math_attention` computes exactly as SDPA would: a
    materialised mask or none needed (no implicit causal flag), no dropout, no option only
    SDPA handles."""
    return (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
        and (mask is not None or not _implicitly_causal(module, query, kwargs))
        and not kwargs.get("dropout")
        and not _needs_transformers_sdpa(kwargs)
        and query.shape[1] % key.shape[1] == 0
    )


def _implicitly_causal(module, query: Tensor, kwargs: dict) -> bool:
    """Whether transformers' SDPA path would pass is_causal=True for a call without a mask."""
    flag = kwargs.get("is_causal")
    flag = getattr(module, "is_causal", True) if flag is None else flag
    return query.shape[2] > 1 and bool(flag)


def _native_gqa(module: torch.nn.Module, query: Tensor, mask: Tensor | None, kwargs: dict) -> bool:
    """Grouped-query attention with a mask on CPU: SDPA's own `enable_gqa` beats repeat_kv.

    transformers copies each K/V head per query group before SDPA whenever a mask is present
    (its CUDA kernels need that); the CPU kernels read the shared heads directly, which saves
    the copy and its memory (a 4-6% shorter training step on SmolLM2).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    return (
        query.device.type == "cpu"
        and groups > 1
        and mask is not None
        and not _needs_transformers_sdpa(kwargs)
    )


def _needs_transformers_sdpa(kwargs: dict) -> bool:
    """Options only transformers' own SDPA path handles (or refuses) correctly."""
    return any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "cache")) or bool(
        kwargs.get("output_attentions")
    )


def _gqa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_: object,
) -> tuple[Tensor, None]:
    """SDPA over (B, H, T, D) queries and (B, H_kv, S, D) keys/values -> (B, T, H, D)."""
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def _prefix_mask(*args, **kwargs):
    """The SDPA boolean mask, always materialised (a skipped causal mask would misalign)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the 'prefixtune' attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTN_NAME, _prefix_mask)


def _site_of(name: str, module: torch.nn.Module, encoder_decoder: bool) -> Site | None:
    """Classify an attention module by its qualified name; None for non-attention modules."""
    layer = getattr(module, "layer_idx", None)
    if layer is None or not type(module).__name__.endswith("Attention"):
        return None
    if not encoder_decoder:
        return None if "cross" in name else Site("self", layer)
    if ".encoder." in f".{name}":
        return Site("encoder", layer)
    if "encoder_attn" in name or "cross" in name:
        return Site("cross", layer)
    return Site("decoder", layer)


def tag_sites(model: PreTrainedModel) -> dict[str, int]:
    """Mark each attention module with its Site; returns layers per attention kind."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    layers: dict[str, int] = {}
    for name, module in model.named_modules():
        site = _site_of(name, module, encoder_decoder)
        if site is not None:
            setattr(module, SITE_ATTR, site)
            layers[site.kind] = max(layers.get(site.kind, 0), site.layer + 1)
    return layers


def position_ids_for(attention_mask: Tensor, offset: Tensor) -> Tensor:
    """Positions of real tokens, shifted by each row's prefix length; pads get position 0.

    attention_mask: (B, T) with 1 on real tokens (left or right padding); offset: (B,).
    """
    positions = attention_mask.long().cumsum(-1) - 1 + offset[:, None]  # (B, T)
    return positions.masked_fill(attention_mask == 0, 0)


def prefixed_forward(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix_kv: PrefixKV | None,
    **kwargs,
):
    """Run the model with `prefix_kv` injected; real-token positions start after each row's prefix.

    Decoder-only models get explicit position ids (offset by the row's prefix length, counting
    only real tokens, so left padding is harmless). Encoder-decoder positions stay as they are.
    """
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if not encoder_decoder and "position_ids" not in kwargs:
        offset = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if prefix_kv is not None:
            offset = prefix_kv.row_lengths(input_ids.shape[0], input_ids.device)
        kwargs["position_ids"] = position_ids_for(attention_mask, offset)
    return model(input_ids=input_ids, attention_mask=attention_mask, prefix_kv=prefix_kv, **kwargs)
