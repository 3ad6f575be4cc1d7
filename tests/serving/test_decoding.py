"""The shared decoding path's text handling, without a server: incremental detokenisation never
splits a multi-byte character and never releases text that may still become a stop string;
tokens holding part of a character are named by their bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixtune.serving.decoding import Detokenizer
from prefixtune.serving.token_text import token_bytes, token_text

TEXTS = ["plain ascii text", "café — naïve 漢字 🙂 done", "🙂🙂 a\nb", "x"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_add_up(bpe_tokenizer, text):
    ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= len(text.encode()) // 4  # byte-level: multi-byte characters span tokens
    detok = Detokenizer(bpe_tokenizer, [])
    pieces = [detok.push(token)[0] for token in ids] + [detok.finish()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == bpe_tokenizer.decode(ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.sampled_from("ab é漢\n🙂"), min_size=1, max_size=16),
       stop=st.text(st.sampled_from("ab é\n"), min_size=1, max_size=3))  # fmt: skip
def test_stop_strings_cut_the_text_and_are_never_released(bpe_tokenizer, text, stop):
    ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    full = bpe_tokenizer.decode(ids)
    detok = Detokenizer(bpe_tokenizer, [stop])
    released = ""
    for token in ids:
        released += detok.push(token)[0]
        if detok.stopped:
            break
        assert stop not in released
    released += detok.finish()
    want = full[: full.find(stop)] if stop in full else full
    assert released == want and detok.stopped == (stop in full)


def test_partial_character_tokens_are_named_by_their_bytes(bpe_tokenizer):
    ids = bpe_tokenizer("漢", add_special_tokens=False)["input_ids"]
    raw = b"".join(token_bytes(bpe_tokenizer, t) for t in ids)
    assert raw == "漢".encode()
    if len(ids) > 1:  # each token alone is part of the character
        names = [token_text(bpe_tokenizer, t) for t in ids]
        assert all(name.startswith("bytes:\\x") for name in names)
    assert (
        token_text(bpe_tokenizer, bpe_tokenizer("a", add_special_tokens=False)["input_ids"][0])
        == "a"
    )
