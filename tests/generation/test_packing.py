"""Packed prefill and the preallocated KV cache against the plain padded path, on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import prefixtune.generation.prefill as generation
from prefixtune.config import GenerateConfig, PrefixConfig
from prefixtune.core.attention import PrefixKV
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.prefix_encoder import build_encoder
from prefixtune.generation.engine import generate
from prefixtune.generation.kvcache import PreallocatedLayer
from prefixtune.generation.packing import packing_pays
from prefixtune.generation.prefill import left_pad, prefill_decoder

from conftest import BUILDERS, assert_same_prefill_state

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25], [30]]
NEVER = 1_000_000  # an EOS id no tiny model emits

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def mixed_prefix(model, rows: tuple[int, ...] = (1, 0, 1, 1, 0)) -> PrefixKV:
    stack = [build_encoder(model, PrefixConfig(length=n, reparam=False)).bake() for n in (3, 5)]
    return PrefixKV.stack(stack, rows=torch.tensor(rows))


def prefix_per_row(model) -> PrefixKV:
    """One prefix for each row, row i's at index i (rows=None, N == B): packing once counted
    one distinct prefix here and built a mask narrower than the keys (a crash)."""
    lengths = (3, 5, 2, 4, 3)
    stack = [build_encoder(model, PrefixConfig(length=n, reparam=False), seed=i).bake()
             for i, n in enumerate(lengths)]  # fmt: skip
    return PrefixKV.stack(stack)


PREFIXES = {"none": lambda model: None, "mixed": mixed_prefix, "per-row": prefix_per_row}


def prefill(model, prefix, pack: bool, monkeypatch):
    monkeypatch.setattr(generation, "packing_pays", lambda *args: pack)
    ids, mask = left_pad(PROMPTS, 0)
    with torch.inference_mode():
        return prefill_decoder(model, ids, mask, prefix, 4, None)


@pytest.mark.parametrize("kind", sorted(PREFIXES))
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_packed_prefill_leaves_the_state_a_padded_prefill_leaves(name, kind, monkeypatch):
    model = BUILDERS[name]()
    enable_prefixes(model)
    prefix = PREFIXES[kind](model)
    (padded, padded_logits), (packed, packed_logits) = (
        prefill(model, prefix, pack, monkeypatch) for pack in (False, True)
    )
    assert_same_prefill_state(packed, packed_logits, padded, padded_logits)


@pytest.mark.parametrize("kind", ["mixed", "per-row"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generation_after_a_packed_prefill_equals_the_padded_one(name, kind, monkeypatch):
    model = BUILDERS[name]()
    prefix = PREFIXES[kind](model)
    ids, mask = left_pad(PROMPTS, 0)
    outputs, calls = {}, []
    for pack in (False, True):
        monkeypatch.setattr(
            generation, "packing_pays", lambda *args, pack=pack: calls.append(1) or pack
        )
        config = GenerateConfig(max_new_tokens=6)
        outputs[pack] = generate(
            model, ids, mask, prefix, config, eos_token_id=NEVER, pad_token_id=0
        )
    assert calls and outputs[True] == outputs[False]
    if prefix.rows is None:  # and each row decodes as it does alone with its own prefix
        monkeypatch.setattr(generation, "packing_pays", lambda *args: False)
        for i, prompt in enumerate(PROMPTS):
            one = PrefixKV({k: v[i : i + 1] for k, v in prefix.kv.items()},
                           valid=prefix.valid[i : i + 1])  # fmt: skip
            ids, mask = left_pad([prompt], 0)
            alone = generate(model, ids, mask, one, GenerateConfig(max_new_tokens=6),
                             eos_token_id=NEVER, pad_token_id=0)  # fmt: skip
            assert alone[0] == outputs[False][i]


def right_aligned(lengths: list[int]) -> torch.Tensor:
    return left_pad([[1] * n for n in lengths], 0)[1]


def test_packing_pays_only_when_padding_outweighs_the_wider_attention():
    model = BUILDERS["llama"]()
    assert packing_pays(model, right_aligned([4, 2, 3, 6]), None)
    assert packing_pays(model, right_aligned([4, 2, 3, 6]), mixed_prefix(model, (0, 1, 0, 1)))
    assert not packing_pays(model, right_aligned([6, 6, 6, 6]), None)  # nothing to save
    assert not packing_pays(model, right_aligned([900, 1000, 950, 1000]), None)  # S^2 attention


def test_masks_with_holes_and_alibi_models_are_never_packed():
    model = BUILDERS["llama"]()
    holes = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert not packing_pays(model, holes, None)
    model.config.alibi = True
    assert not packing_pays(model, right_aligned([4, 2, 3, 6]), None)


def test_a_mask_with_holes_decodes_as_the_padded_path(monkeypatch):
    model = BUILDERS["llama"]()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 0, 11, 12, 13], [0, 0, 0, 0, 20, 21]])
    mask = (ids != 0).long()
    config = GenerateConfig(max_new_tokens=5)
    outputs = {}
    for name, pays in (("auto", packing_pays), ("padded", lambda *args: False)):
        monkeypatch.setattr(generation, "packing_pays", pays)
        outputs[name] = generate(model, ids, mask, None, config, eos_token_id=NEVER, pad_token_id=0)
    assert outputs["auto"] == outputs["padded"]


def test_preallocated_layer_writes_in_place_and_matches_a_dynamic_layer():
    mine, plain = PreallocatedLayer(capacity=6), DynamicLayer()
    steps = [torch.randn(3, 2, n, 4) for n in (4, 1, 1)]
    for states in steps:
        mine.update(states, -states)
        plain.update(states, -states)
    buffer = mine.keys.data_ptr()
    for states in [torch.randn(3, 2, 1, 4) for _ in range(3)]:  # 6 -> 9 positions: one regrowth
        mine.update(states, -states)
        plain.update(states, -states)
    assert mine.keys.data_ptr() != buffer and mine._key_buffer.shape[-2] == 12  # doubled
    assert torch.equal(mine.keys, plain.keys) and torch.equal(mine.values, plain.values)
    assert mine.get_seq_length() == plain.get_seq_length() == 9
    index = torch.tensor([2, 0])
    mine.reorder_cache(index)
    plain.reorder_cache(index)
    assert torch.equal(mine.keys, plain.keys) and mine._key_buffer.shape[-2] == 12
    mine.keys, mine.values = mine.keys[:, :, 3:], mine.values[:, :, 3:]  # a trim
    states = torch.randn(2, 2, 1, 4)
    keys, values = mine.update(states, -states)
    assert torch.equal(keys, torch.cat([plain.keys[:, :, 3:], states], dim=2))
    assert torch.equal(values, torch.cat([plain.values[:, :, 3:], -states], dim=2))


def test_keys_and_values_assigned_one_after_the_other_keep_their_own_length():
    """continuous._merge pads and assigns keys, then reads values to pad them the same way."""
    layer = PreallocatedLayer(capacity=16)
    states = torch.randn(2, 2, 3, 4)
    layer.update(states, -states)
    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 2, 0))  # 3 -> 5 positions
    assert layer.values.shape[-2] == 3  # not a view over 5 positions of the old buffer
    layer.values = torch.nn.functional.pad(layer.values, (0, 0, 2, 0))
    assert torch.equal(layer.values[:, :, 2:], -states) and layer.get_seq_length() == 5


def test_hybrid_models_with_convolution_layers_are_never_packed(monkeypatch):
    from transformers import Lfm2Config, Lfm2ForCausalLM

    config = Lfm2Config(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                        layer_types=["conv", "full_attention", "conv"], pad_token_id=0,
                        max_position_embeddings=128)  # fmt: skip
    config._attn_implementation = "sdpa"
    model = Lfm2ForCausalLM(config).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11, 12], [9, 10], [11]], 0)
    assert packing_pays(model, mask, None)  # by FLOPs alone it would pay
    monkeypatch.setattr(generation, "packed_prefill", lambda *args: pytest.fail("packed"))
    rows = generate(model, ids, mask, None, GenerateConfig(max_new_tokens=3), eos_token_id=NEVER,
                    pad_token_id=0)  # fmt: skip
    assert [len(row) for row in rows] == [3, 3, 3]
