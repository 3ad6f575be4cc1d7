"""BART prefixes against an independent computation: every attention module of a tiny BART
replaced by plain-torch attention written here from the module's own weights (q/k/v/out
projections, scaling), its own masks (encoder padding, decoder causality) and each row's prefix
keys/values concatenated in front of the projected ones. Nothing of prefixtune's attention
function, mask extension or prefix stacking runs in the reference."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import Tensor

from prefixtune.config import PrefixConfig
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.prefix_encoder import build_encoder

from conftest import tiny_bart

KINDS = ("encoder", "decoder", "cross")
SOURCE = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # two rows: the second is padded
TARGET = torch.tensor([[2, 20, 21, 22, 23], [2, 30, 31, 32, 33]])  # decoder inputs (start = 2)
PAD = 1
ATOL = 1e-5  # fp32 rounding: measured <1e-7 on the logits, <5e-7 on the encoder output

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def encoder_inputs() -> tuple[Tensor, Tensor]:
    """Right-padded source ids (B, S) and their (B, S) 0/1 mask."""
    width = max(map(len, SOURCE))
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in SOURCE])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in SOURCE])
    return ids, mask


def reference_attention(
    module: torch.nn.Module,
    hidden: Tensor,
    source: Tensor,
    keep: Tensor,
    prefix: list[tuple[Tensor, Tensor]] | None,
) -> Tensor:
    """softmax(q [Kp; K]^T * scaling + mask) [Vp; V], then out_proj, one row at a time.

    hidden: (B, T, d) queries' input; source: (B, S, d) keys/values' input (hidden itself, or
    the encoder output for cross-attention); keep: (B, T, S) bool, which real keys each query
    sees; prefix: per row (keys, values), each (H, P_b, D), visible to every query."""
    heads, dim = module.num_heads, module.head_dim
    rows = []
    for b in range(hidden.shape[0]):
        q = module.q_proj(hidden[b]).view(-1, heads, dim).transpose(0, 1)  # (H, T, D)
        k = module.k_proj(source[b]).view(-1, heads, dim).transpose(0, 1)  # (H, S, D)
        v = module.v_proj(source[b]).view(-1, heads, dim).transpose(0, 1)
        visible = keep[b]  # (T, S)
        if prefix is not None:
            p_key, p_value = prefix[b]
            k, v = torch.cat([p_key, k], 1), torch.cat([p_value, v], 1)  # (H, P_b + S, D)
            visible = torch.cat([visible.new_ones(len(visible), p_key.shape[1]), visible], 1)
        scores = (q @ k.transpose(-1, -2)) * module.scaling  # (H, T, P_b + S)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        rows.append((probs @ v).transpose(0, 1).reshape(hidden.shape[1], heads * dim))
    return module.out_proj(torch.stack(rows))  # (B, T, d)


def reference_model(model, prefixes: list[dict[str, Tensor]], rows: list[int], kinds, mask):
    """A copy of `model` whose attention modules run `reference_attention`; row b uses
    prefixes[rows[b]] for the attention kinds in `kinds`."""
    reference = copy.deepcopy(model)
    source_mask = mask.bool()  # (B, S)

    def install(module, kind: str, layer: int) -> None:
        def forward(self, hidden_states, key_value_states=None, attention_mask=None, **_):
            source = hidden_states if key_value_states is None else key_value_states
            batch, t_len, s_len = hidden_states.shape[0], hidden_states.shape[1], source.shape[1]
            if kind == "decoder":  # causal over the decoder's own tokens (none padded here)
                keep = torch.ones(t_len, s_len, dtype=torch.bool).tril().expand(batch, -1, -1)
            else:  # encoder self-attention and cross-attention: every real source token
                keep = source_mask[:, None, :].expand(batch, t_len, s_len)
            prefix = None
            if kind in kinds:
                prefix = [(prefixes[r][kind][layer, 0], prefixes[r][kind][layer, 1]) for r in rows]
            return reference_attention(self, hidden_states, source, keep, prefix), None

        module.forward = types.MethodType(forward, module)

    for layer, block in enumerate(reference.model.encoder.layers):
        install(block.self_attn, "encoder", layer)
    for layer, block in enumerate(reference.model.decoder.layers):
        install(block.self_attn, "decoder", layer)
        install(block.encoder_attn, "cross", layer)
    return reference


@pytest.fixture(scope="module")
def setup():
    """A tiny BART with prefixtune attention and two baked prefixes of different lengths."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_bart()
        prefixes = []
        for length in (3, 5):
            encoder = build_encoder(model, PrefixConfig(length=length, reparam=False))
            with torch.no_grad():
                for part in encoder.parts.values():
                    part.table.mul_(4.0)  # a strong prefix: its effect is far above rounding
            prefixes.append(encoder.bake())
    return model, prefixes


def outputs(model, ids, mask, prefix: PrefixKV | None, **extra) -> tuple[Tensor, Tensor]:
    """(decoder logits (B, T, V), encoder output (B, S, d)) of one forward pass."""
    with torch.no_grad():
        out = prefixed_forward(model, ids, mask, prefix, decoder_input_ids=TARGET, **extra)
    return out.logits, out.encoder_last_hidden_state


@pytest.mark.parametrize("kinds", [(kind,) for kind in KINDS] + [KINDS], ids="+".join)
def test_bart_prefix_equals_plain_torch_attention_with_concatenated_prefix(setup, kinds):
    """Mixed per-row prefixes of different lengths on a padded batch, each attention kind alone
    and all together, equal the plain-torch reference on the same weights."""
    model, prefixes = setup
    ids, mask = encoder_inputs()
    rows = [1, 0]  # row 0 uses the 5-position prefix, row 1 the 3-position one
    stacked = PrefixKV.stack([{k: p[k] for k in kinds} for p in prefixes], rows=torch.tensor(rows))
    logits, encoded = outputs(model, ids, mask, stacked)
    reference = reference_model(model, prefixes, rows, kinds, mask)
    ref_logits, ref_encoded = outputs(reference, ids, mask, None, use_cache=False)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    real = mask.bool()  # padded encoder positions are never read (masked as keys)
    torch.testing.assert_close(encoded[real], ref_encoded[real], atol=ATOL, rtol=0)
    plain_logits, _ = outputs(model, ids, mask, None)
    assert (plain_logits - ref_logits).abs().max() > 20 * ATOL  # the prefix matters


def test_reference_without_prefix_equals_transformers_bart(setup):
    """The reference attention itself: with no prefix it reproduces the untouched model."""
    model, prefixes = setup
    ids, mask = encoder_inputs()
    reference = reference_model(model, prefixes, [0, 0], (), mask)
    ref_logits, _ = outputs(reference, ids, mask, None, use_cache=False)
    plain = tiny_bart()
    plain.load_state_dict(model.state_dict())  # transformers' own attention, same weights
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=TARGET).logits
    torch.testing.assert_close(ref_logits, expected, atol=ATOL, rtol=0)
