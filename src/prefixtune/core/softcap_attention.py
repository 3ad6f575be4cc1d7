"""Attention with logit soft-capping (Gemma-2, VaultGemma): scores = c * tanh(q.k * scale / c).

PyTorch's SDPA has no soft-capping and transformers' SDPA path refuses it, so these families
compute attention eagerly, as their own "eager" implementation does: scaled scores, capped,
masked, an fp32 softmax, then the values. Prefix columns are ordinary keys here (the cap applies
to them as to every key), so a prefix of the model's own keys/values reproduces it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def softcapped_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    softcap: float,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """(B, H, T, D) queries over (B, H_kv, S, D) keys/values -> ((B, T, H, D) output, weights).

    mask: (B or 1, 1, T, S) boolean keep-mask or additive float mask, or None (causal when the
    module is causal and T > 1, bottom-right aligned)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    value = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, H, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    t_len, s_len = scores.shape[-2:]
    if mask is None and t_len > 1 and getattr(module, "is_causal", True):
        ones = torch.ones(t_len, s_len, dtype=torch.bool, device=scores.device)
        mask = torch.tril(ones, diagonal=s_len - t_len)[None, None]
    if mask is not None:
        if mask.dtype == torch.bool:  # finite where masked: a fully padded row stays finite
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask[..., :s_len]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), weights
