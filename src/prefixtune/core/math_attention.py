"""Attention as two batched matmuls around an fp32 softmax, with a hand-written backward.

For the short rows of prefix-tuning (a few hundred keys) this beats PyTorch's CPU bf16
flash-attention kernel in training: its backward costs about as much for 40 keys as for 300, while
the score matrix of a short row is small enough to keep. The matmuls run in the inputs' dtype
(bf16 on AMX, accumulating in fp32); the softmax and its backward run in fp32 (or wider), as
transformers' eager attention does under autocast. Grouped-query attention reads each shared
key/value head once: the query heads of a group are stacked along the rows of one matmul.

The probabilities are kept for backward in the inputs' dtype (2 bytes a score in bf16, as the
matmul with the values reads them); recomputing them instead, flash-style, measured no faster
than the fp32-kernel route this replaced. The kept matrix is what bounds the rows this pays for (`attention.attend`
sets the limit).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _grouped(query: Tensor, kv_heads: int) -> Tensor:
    """(B, H, T, D) -> (B, H_kv, G*T, D): the G query heads that share one key/value head."""
    batch, heads, length, dim = query.shape
    return query.reshape(batch, kv_heads, (heads // kv_heads) * length, dim)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scores_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An additive fp32 bias from a boolean keep-mask or a float mask; finite where masked, so a
    row with every key masked (padding) averages its keys instead of turning NaN."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _scores(query: Tensor, key: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """(B, H, T, D) queries, (B, H_kv, S, D) keys -> (B, H_kv, G, T, S) scaled, biased scores in
    the softmax dtype."""
    batch, heads, length, _ = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    scores = _grouped(query, kv_heads) @ key.transpose(-1, -2)  # (B, H_kv, G*T, S)
    shape = (batch, kv_heads, heads // kv_heads, length, keys)
    scores = scores.to(_softmax_dtype(query.dtype)).view(shape).mul_(scale)
    if bias is not None:  # (B|1, H|1, T, S) -> (B|1, H_kv|1, G|1, T, S)
        split = (1, 1) if bias.shape[1] == 1 else shape[1:3]
        scores += bias.reshape(bias.shape[0], *split, length, keys)
    return scores


def _weighted(probs: Tensor, value: Tensor) -> Tensor:
    """(B, H_kv, G, T, S) probabilities, (B, H_kv, S, D) values -> (B, H, T, D)."""
    batch, kv_heads, groups, length, keys = probs.shape
    rows = probs.reshape(batch, kv_heads, groups * length, keys).to(value.dtype)
    return (rows @ value).view(batch, kv_heads * groups, length, value.shape[-1])


class _MathAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None,
                scale: float) -> Tensor:  # fmt: skip
        probs = torch.softmax(_scores(query, key, bias, scale), dim=-1).to(value.dtype)
        out = _weighted(probs, value)
        ctx.save_for_backward(query, key, value, probs)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, key, value, kept = ctx.saved_tensors
        batch, heads, length, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        dtype = value.dtype
        flat = kept.view(batch, kv_heads, -1, keys)  # (B, H_kv, G*T, S)
        probs = flat.to(_softmax_dtype(dtype))
        grad_rows = _grouped(grad_out.to(dtype), kv_heads)  # (B, H_kv, G*T, D)
        grad_value = flat.transpose(-1, -2) @ grad_rows  # (B, H_kv, S, D)
        grad_probs = (grad_rows @ value.transpose(-1, -2)).to(probs.dtype)  # (B, H_kv, G*T, S)
        # softmax backward in place: dS = P * (dP - sum(dP * P)), times the scale of the scores
        inner = (grad_probs * probs).sum(-1, keepdim=True)
        grad_scores = grad_probs.sub_(inner).mul_(probs).mul_(ctx.scale).to(dtype)
        grad_query = (grad_scores @ key).view(batch, heads, length, dim)
        grad_key = grad_scores.transpose(-1, -2) @ _grouped(query, kv_heads)  # (B, H_kv, S, D)
        return grad_query, grad_key, grad_value, None, None


def math_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                   scale: float | None = None) -> Tensor:  # fmt: skip
    """Softmax attention of (B, H, T, D) queries over (B, H_kv, S, D) keys/values (H a multiple
    of H_kv); `mask` boolean (True: attend) or additive, broadcastable as (B|1, H|1, T, S).
    Returns (B, H, T, D) in the inputs' dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if mask is not None:
        mask = mask.expand(mask.shape[0], mask.shape[1], query.shape[2], key.shape[2])
    bias = _scores_bias(mask, _softmax_dtype(query.dtype))
    if torch.compiler.is_compiling():  # the graph's own autograd; inductor fuses the softmax
        return _weighted(torch.softmax(_scores(query, key, bias, scale), dim=-1), value)
    return _MathAttention.apply(query, key, value, bias, scale)
