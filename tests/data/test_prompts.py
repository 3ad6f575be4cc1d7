"""Text -> prompt ids for generation (evaluation and serving share it): decoder-only prompts in
the trained format, encoder inputs cut to the source limit."""

from __future__ import annotations

from prefixtune.data.encoding import encode_prompt, prompt_ids


def test_decoder_only_prompt_is_the_trained_prompt(bpe_tokenizer):
    source = "name[The Eagle] area[city centre] food[Japanese]"
    for separator, limit in (("\n", None), (" TL;DR: ", None), ("\n", 6)):
        got = encode_prompt(source, bpe_tokenizer, encoder_decoder=False, separator=separator,
                            max_source_tokens=limit)  # fmt: skip
        assert got == prompt_ids(source, bpe_tokenizer, separator=separator,
                                 max_source_tokens=limit)  # fmt: skip
    cut = encode_prompt(source, bpe_tokenizer, encoder_decoder=False, max_source_tokens=6)
    assert len(cut) == 6


def test_encoder_input_is_the_tokenized_source_cut_to_the_limit(bpe_tokenizer):
    source = "name[The Eagle] area[city centre] food[Japanese]"
    whole = bpe_tokenizer(source)["input_ids"]
    assert encode_prompt(source, bpe_tokenizer, encoder_decoder=True) == whole
    assert encode_prompt(source, bpe_tokenizer, encoder_decoder=True, separator="X") == whole
    cut = encode_prompt(source, bpe_tokenizer, encoder_decoder=True, max_source_tokens=5)
    assert cut == whole[:5] and len(whole) > 5
