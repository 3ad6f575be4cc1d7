"""Tokenisation into training examples (prompt, target, loss mask), truncation, padding and
length-bucketed batches, with tiny tokenizers of three styles (GPT-2, Llama, BART)."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prefixtune.data.encoding import (
    IGNORE_INDEX,
    Encoded,
    adds_bos,
    collate,
    collate_seq2seq,
    encode,
    length_bucketed_batches,
    prompt_ids,
)
from prefixtune.data.records import (
    Example,
)

# ----------------------------------------------------------------------------- tiny tokenizers

CORPUS = [
    "name : Alimentum | area : city centre | family friendly : no",
    "There is a place in the city centre , Alimentum , that is not family - friendly .",
    "| Aarhus_Airport : cityServed : Aarhus | Bakso : country : Indonesia",
    "The quick brown fox jumps over the lazy dog.\n",
]


def tiny_tokenizer(*, bos_first: bool, eos_last: bool = False, pad_is_eos: bool = False):
    """Byte-level BPE (vocab 300) with <pad>=0, <s>=1, </s>=2, built without network."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    single = ("<s> $A" if bos_first else "$A") + (" </s>" if eos_last else "")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    pad = "</s>" if pad_is_eos else "<pad>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad
    )


@pytest.fixture(scope="module")
def tok_plain():  # GPT-2 style: no BOS added by default
    return tiny_tokenizer(bos_first=False)


@pytest.fixture(scope="module")
def tok_bos():  # Llama/SmolLM2 style: BOS first, pad == eos
    return tiny_tokenizer(bos_first=True, pad_is_eos=True)


@pytest.fixture(scope="module")
def tok_s2s():  # BART style: <s> text </s>
    return tiny_tokenizer(bos_first=True, eos_last=True)


def plain_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- encode


EXAMPLES = [
    Example("name : Alimentum | area : city centre", "There is a place in the city centre ."),
    Example("name : Cotto", "Cotto is not family - friendly ."),
]


@pytest.mark.parametrize("tok_name", ["tok_plain", "tok_bos"])
def test_encode_decoder_only(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    assert adds_bos(tok) == (tok_name == "tok_bos")
    encoded, stats = encode(
        EXAMPLES, tok, encoder_decoder=False, max_source_tokens=512, max_target_tokens=512
    )
    assert (stats.n_source_truncated, stats.n_target_truncated, stats.warning()) == (0, 0, None)
    for ex, enc in zip(EXAMPLES, encoded, strict=True):
        prompt = prompt_ids(ex.source, tok)
        bos = [tok.bos_token_id] if tok_name == "tok_bos" else []
        assert prompt == bos + plain_ids(tok, ex.source) + plain_ids(tok, "\n")
        answer = plain_ids(tok, ex.target) + [tok.eos_token_id]
        assert enc.input_ids == prompt + answer
        assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer
        assert tok.decode(enc.input_ids, skip_special_tokens=True) == f"{ex.source}\n{ex.target}"


def test_encode_truncation(tok_bos):
    long = Example("name : Alimentum | area : city centre | family friendly : no", "a " * 40)
    encoded, stats = encode(
        [long, EXAMPLES[1]], tok_bos, encoder_decoder=False, max_source_tokens=6,
        max_target_tokens=5, separator=" |\n",
    )  # fmt: skip
    assert (stats.n_examples, stats.n_source_truncated, stats.n_target_truncated) == (2, 2, 2)
    assert "2 of 2 sources" in stats.warning()
    sep = plain_ids(tok_bos, " |\n")
    for enc in encoded:
        n_prompt = enc.labels.count(IGNORE_INDEX)
        assert n_prompt == 6 and enc.input_ids[0] == tok_bos.bos_token_id
        assert enc.input_ids[n_prompt - len(sep) : n_prompt] == sep  # separator kept
        assert len(enc.input_ids) - n_prompt == 5 and enc.labels[-1] == tok_bos.eos_token_id
    assert (
        prompt_ids(long.source, tok_bos, separator=" |\n", max_source_tokens=6)
        == (encoded[0].input_ids[:6])
    )
    with pytest.raises(ValueError, match="no room"):
        prompt_ids(long.source, tok_bos, separator=" |\n", max_source_tokens=len(sep) + 1)


def test_encode_seq2seq(tok_s2s):
    encoded, stats = encode(
        EXAMPLES, tok_s2s, encoder_decoder=True, max_source_tokens=512, max_target_tokens=512
    )
    assert stats.n_source_truncated == 0
    for ex, enc in zip(EXAMPLES, encoded, strict=True):
        assert enc.input_ids == tok_s2s(ex.source)["input_ids"]
        assert enc.labels == tok_s2s(ex.target)["input_ids"]
        assert enc.labels[0] == tok_s2s.bos_token_id and enc.labels[-1] == tok_s2s.eos_token_id
    encoded, stats = encode(
        EXAMPLES, tok_s2s, encoder_decoder=True, max_source_tokens=4, max_target_tokens=3
    )
    assert (stats.n_source_truncated, stats.n_target_truncated) == (2, 2)
    for enc in encoded:
        assert len(enc.input_ids) == 4 and enc.input_ids[-1] == tok_s2s.eos_token_id
        assert len(enc.labels) == 3 and enc.labels[-1] == tok_s2s.eos_token_id
    batch = collate_seq2seq(encoded + [Encoded([5, 2], [1, 9, 9, 2])], pad_id=0)
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].shape == (3, 4)
    assert batch["labels"][0].tolist()[-1] == IGNORE_INDEX
    assert batch["attention_mask"][2].tolist() == [1, 1, 0, 0]
    assert batch["decoder_attention_mask"][0].tolist() == [1, 1, 1, 0]


def test_encode_requires_eos(tok_plain):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="eos"):
        encode(EXAMPLES, NoEos(), encoder_decoder=False, max_source_tokens=8, max_target_tokens=8)


# ----------------------------------------------------------------------------- collate / batches


def test_collate_pad_equals_eos():
    eos = 2  # pad == eos: the labels must keep the real EOS and mask only the pads
    items = [
        Encoded([1, 5, 6, 7, eos], [-100, -100, 6, 7, eos]),
        Encoded([1, 5, eos], [-100, 5, eos]),
    ]
    right = collate(items, pad_id=eos)
    assert right["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 2, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 5, 2, -100, -100]]
    left = collate(items, pad_id=eos, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6, 7, 2], [2, 2, 1, 5, 2]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, -100, -100, 5, 2]]
    assert all(t.dtype == torch.long for t in left.values())
    with pytest.raises(ValueError, match="padding_side"):
        collate(items, pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="collate_seq2seq"):
        collate([Encoded([1, 2], [3])], pad_id=0)


def padding_of(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_bucketed_batches():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1003)]
    batches = length_bucketed_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert batches == length_bucketed_batches(lengths, 8, seed=1)
    assert batches != length_bucketed_batches(lengths, 8, seed=2)
    order = list(range(1003))
    random.Random(1).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, 1003, 8)]
    assert padding_of(batches, lengths) < 0.2 * padding_of(random_batches, lengths)
    capped = length_bucketed_batches(lengths, 64, seed=1, max_tokens=1000)
    assert sorted(i for b in capped for i in b) == list(range(1003))
    assert all(len(b) * max(lengths[i] for i in b) <= 1000 for b in capped)
    fixed = length_bucketed_batches(lengths, 8, seed=0, shuffle=False)
    flat = [lengths[i] for b in fixed for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert length_bucketed_batches([10, 5000], 4, seed=0, max_tokens=100) in (
        [[1], [0]],
        [[0], [1]],
    )
    assert length_bucketed_batches([], 4, seed=0) == []
    with pytest.raises(ValueError):
        length_bucketed_batches(lengths, 0, seed=0)
