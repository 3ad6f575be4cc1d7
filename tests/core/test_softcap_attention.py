"""Soft-capped attention (Gemma-2, VaultGemma) against the family's own eager attention."""

from __future__ import annotations

import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from prefixtune.core import attention
from prefixtune.core.softcap_attention import softcapped_attention


class Module(torch.nn.Module):
    """What the attention functions read off an attention module."""

    head_dim, num_key_value_groups, is_causal = 8, 2, True


def test_equals_gemma2_eager_attention_with_masks_and_grouped_heads():
    torch.manual_seed(0)
    module = Module().eval()
    query = torch.randn(2, 4, 3, 8) * 4  # scores of several units: the cap bends them
    key, value = torch.randn(2, 2, 5, 8) * 4, torch.randn(2, 2, 5, 8)
    keep = torch.rand(2, 1, 3, 5) > 0.3
    keep[..., 0] = True  # every query sees a key
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    ours, _ = softcapped_attention(module, query, key, value, keep, softcap=2.0, scaling=0.3)
    theirs, _ = eager_attention_forward(
        module, query, key, value, additive, scaling=0.3, softcap=2.0
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    uncapped, _ = eager_attention_forward(module, query, key, value, additive, scaling=0.3)
    assert (ours - uncapped).abs().max() > 1e-2  # the cap matters on these scores


def test_no_mask_is_causal_bottom_right_and_the_attention_layer_routes_here():
    torch.manual_seed(1)
    module = Module().eval()
    query, key, value = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    causal = torch.tril(torch.ones(3, 5, dtype=torch.bool), diagonal=2)[None, None]
    implicit, _ = softcapped_attention(module, query, key, value, None, softcap=1.5)
    explicit, _ = softcapped_attention(module, query, key, value, causal, softcap=1.5)
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)
    routed, _ = attention.attend(module, query, key, value, causal, {"softcap": 1.5})
    torch.testing.assert_close(routed, explicit, atol=0, rtol=0)
