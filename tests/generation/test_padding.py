"""Prompt padding and cache seedability, the one home of each in generation/prefill.py."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from prefixtune.data.encoding import Encoded, collate_seq2seq
from prefixtune.generation.kvcache import preallocated_cache
from prefixtune.generation.prefill import full_attention_decoder, pad_prompts, pad_rows

from conftest import BUILDERS, tiny_bart, tiny_gpt2

ROWS = [[4, 5, 6], [], [7], [8, 9]]


def by_hand(rows: list[list[int]], value: int, side: str) -> tuple[list, list]:
    """Each row padded alone with Python lists: the reference."""
    width = max(map(len, rows), default=0)
    ids, mask = [], []
    for row in rows:
        fill = [value] * (width - len(row))
        ids.append(fill + row if side == "left" else row + fill)
        ones, zeros = [1] * len(row), [0] * (width - len(row))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("rows", [ROWS, [[3]], [[], []], []])
def test_pad_rows_equals_padding_each_row_by_hand(rows, side):
    ids, mask = pad_rows(rows, 9, side)
    assert (ids.tolist(), mask.tolist()) == by_hand(rows, 9, side)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(rows), ids.shape[1])


def test_pad_rows_names_the_sides():
    with pytest.raises(ValueError, match="'left' or 'right'"):
        pad_rows(ROWS, 0, "middle")


def test_prompts_are_left_padded_for_decoders_and_right_padded_for_encoders():
    ids, mask = pad_prompts(tiny_gpt2(), ROWS, 0)
    assert (ids.tolist(), mask.tolist()) == by_hand(ROWS, 0, "left")
    ids, mask = pad_prompts(tiny_bart(), ROWS, 1)
    batch = collate_seq2seq([Encoded(row, [1]) for row in ROWS], 1)  # the training batches
    assert ids.tolist() == batch["input_ids"].tolist()
    assert mask.tolist() == batch["attention_mask"].tolist()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_full_attention_decoder_with_or_without_a_cache(name):
    model = BUILDERS[name]()
    expected = name in ("gpt2", "llama")  # gemma3: sliding windows; bart: encoder-decoder
    assert full_attention_decoder(model) is expected
    if name != "bart":
        assert full_attention_decoder(model, DynamicCache(config=model.config)) is expected
        assert full_attention_decoder(model, preallocated_cache(model.config, 8)) is expected
