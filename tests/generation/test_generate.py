"""Generation engine against independent computations: the model recomputed on the full sequence
each step, each row alone, and `transformers`' own generate, on tiny random models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from prefixtune.config import ConfigError, GenerateConfig, PrefixConfig
from prefixtune.core.attention import KVCapture, PrefixKV, prefixed_forward
from prefixtune.core.prefix_encoder import build_encoder
from prefixtune.core.runtime import enable_gradient_checkpointing
from prefixtune.generation.beam import beam_search
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad, prefill_decoder, prefill_encoder_decoder

from conftest import BUILDERS, DECODER_ONLY, VOCAB, tiny_bart, tiny_gpt2, tiny_llama

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25]]
UNUSED_EOS = VOCAB - 1  # not produced by these seeded models: rows run to max_new_tokens
PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def inputs(name: str, prompts: list[list[int]] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding for decoder-only models; right padding for BART's encoder (absolute positions)."""
    if name not in DECODER_ONLY:
        width = max(map(len, prompts))
        ids = torch.tensor([p + [1] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
        return ids, mask
    return left_pad(prompts, PAD)


def run(model, ids, mask, prefix=None, eos=UNUSED_EOS, in_cache=None, **config) -> list[list[int]]:
    config = GenerateConfig(**{"max_new_tokens": 8, **config})
    return generate(
        model,
        ids,
        mask,
        prefix,
        config,
        eos_token_id=eos,
        pad_token_id=PAD,
        prefix_in_cache=in_cache,
    )


def prefixes(model, lengths=(3, 5, 2)) -> list[dict[str, torch.Tensor]]:
    return [build_encoder(model, PrefixConfig(length=n, reparam=False)).bake() for n in lengths]


def recompute_greedy(model, prompt, prefix, steps, eos=UNUSED_EOS) -> list[int]:
    """Greedy decoding of one row without any cache: the whole sequence every step."""
    out: list[int] = []
    encoder_decoder = model.config.is_encoder_decoder
    for _ in range(steps):
        if encoder_decoder:
            ids = torch.tensor([prompt])
            decoder = torch.tensor([[model.config.decoder_start_token_id] + out])
            extra = {"decoder_input_ids": decoder, "use_cache": False}
        else:
            ids, extra = torch.tensor([prompt + out]), {"use_cache": False}
        logits = prefixed_forward(model, ids, torch.ones_like(ids), prefix, **extra).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


def strip_hf(sequences: torch.Tensor, start: int, eos: int) -> list[list[int]]:
    """HF output rows -> new tokens up to (not including) the first EOS."""
    rows = [row[start:].tolist() for row in sequences]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def likely_eos(model, ids, mask, num_beams: int = 3) -> int:
    """A token these prompts produce early on, so EOS decisions matter in the comparison."""
    probe = run(model, ids, mask, num_beams=num_beams, max_new_tokens=6)
    return max((row[2] for row in probe), key=lambda t: sum(t in row for row in probe))


@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cached_greedy_equals_recomputing_each_step(name, with_prefix):
    model = BUILDERS[name]()
    build_encoder(model, PrefixConfig(length=2))  # routes attention through prefixtune
    stack, order = prefixes(model, (4, 2)), [0, 1, 1, 0]
    prefix = PrefixKV.stack(stack, rows=torch.tensor(order)) if with_prefix else None
    ids, mask = inputs(name)
    batched = run(model, ids, mask, prefix)
    for i, (prompt, got) in enumerate(zip(PROMPTS, batched, strict=True)):
        alone = PrefixKV.stack([stack[order[i]]]) if with_prefix else None
        assert got == recompute_greedy(model, prompt, alone, steps=8)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_batched_mixed_prefixes_equal_each_row_alone(name, num_beams):
    model = BUILDERS[name]()
    stack = prefixes(model, (3, 5, 2))  # different lengths
    order = [2, 0, 1, 0]  # row i uses prefix order[i]
    ids, mask = inputs(name)
    batch = run(
        model, ids, mask, PrefixKV.stack(stack, rows=torch.tensor(order)), num_beams=num_beams
    )
    for i, prompt in enumerate(PROMPTS):
        alone_ids, alone_mask = inputs(name, [prompt])
        alone = run(
            model, alone_ids, alone_mask, PrefixKV.stack([stack[order[i]]]), num_beams=num_beams
        )
        assert batch[i] == alone[0], f"row {i}"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bart"])
def test_beam_search_with_one_beam_equals_greedy(name):
    model = BUILDERS[name]()
    ids, mask = inputs(name)
    eos = likely_eos(model, ids, mask, num_beams=1)
    greedy = run(model, ids, mask, eos=eos, max_new_tokens=10)
    config = GenerateConfig(max_new_tokens=10, num_beams=1, length_penalty=1.3)
    eos_t, history = torch.tensor([eos]), ids[:, :0]
    with torch.no_grad():
        if name == "bart":
            state, logits = prefill_encoder_decoder(model, ids, mask, None, 10)
            history = torch.full((len(ids), 1), model.config.decoder_start_token_id)
        else:
            state, logits = prefill_decoder(model, ids, mask, None, 10, None)
        assert beam_search(state, logits, config, eos_t, history, PAD) == greedy
    assert any(len(row) < 10 for row in greedy)  # EOS took part


@pytest.mark.parametrize("name", list(BUILDERS))
def test_greedy_equals_transformers_generate(name):
    model = BUILDERS[name]()
    reference = copy.deepcopy(model)  # before build_encoder switches attention to prefixtune
    build_encoder(model, PrefixConfig(length=2))
    ids, mask = inputs(name)
    eos = likely_eos(reference, ids, mask)
    hf = reference.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=10,
        min_new_tokens=0, eos_token_id=eos, pad_token_id=PAD,
    )  # fmt: skip
    start = 1 if name == "bart" else ids.shape[1]
    assert run(model, ids, mask, eos=eos, max_new_tokens=10) == strip_hf(hf, start, eos)


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("length_penalty", [0.8, 2.0])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_beam_search_equals_transformers(name, length_penalty, early_stopping):
    model = BUILDERS[name]()
    ids, mask = inputs(name)
    eos = likely_eos(model, ids, mask)
    settings = {"num_beams": 3, "length_penalty": length_penalty, "early_stopping": early_stopping}
    hf = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, min_new_tokens=0,
        eos_token_id=eos, pad_token_id=PAD, **settings,
    )  # fmt: skip
    ours = run(model, ids, mask, eos=eos, max_new_tokens=10, **settings)
    assert ours == strip_hf(hf, 1 if name == "bart" else ids.shape[1], eos)


def repeats(row: list[int], size: int) -> bool:
    grams = [tuple(row[i : i + size]) for i in range(len(row) - size + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_is_respected(num_beams):
    model = tiny_gpt2()  # loops on a token or two without the constraint
    ids, mask = inputs("gpt2")
    assert any(repeats(row, 2) for row in run(model, ids, mask, max_new_tokens=12))
    for row in run(
        model, ids, mask, max_new_tokens=12, num_beams=num_beams, no_repeat_ngram_size=2
    ):
        assert len(row) == 12 and not repeats(row, 2)


def test_no_repeat_ngram_on_bart_equals_transformers():
    model = tiny_bart()  # the decoder start token counts, as in transformers
    ids, mask = inputs("bart")
    for num_beams in (1, 3):
        hf = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
            max_new_tokens=10, min_new_tokens=0, no_repeat_ngram_size=2, eos_token_id=UNUSED_EOS,
            pad_token_id=PAD,
        )  # fmt: skip
        ours = run(model, ids, mask, num_beams=num_beams, max_new_tokens=10, no_repeat_ngram_size=2)
        assert ours == strip_hf(hf, 1, UNUSED_EOS)


def test_sampling_is_reproducible_and_depends_on_the_seed():
    model = tiny_llama()
    ids, mask = inputs("llama")
    settings = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "max_new_tokens": 12}
    first = run(model, ids, mask, seed=1, **settings)
    assert first == run(model, ids, mask, seed=1, **settings)
    assert first != run(model, ids, mask, seed=2, **settings)
    # a vanishing nucleus keeps only the most likely token: sampling becomes greedy
    nucleus = run(model, ids, mask, do_sample=True, top_p=1e-6, max_new_tokens=12)
    assert nucleus == run(model, ids, mask, max_new_tokens=12)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_prefix_changes_outputs(name):
    model = BUILDERS[name]()
    ids, mask = inputs(name)
    encoder = build_encoder(model, PrefixConfig(length=4, reparam=False))
    with torch.no_grad():
        for part in encoder.parts.values():
            part.table.mul_(8.0)  # a strong random prefix
    assert run(model, ids, mask, encoder()) != run(model, ids, mask)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", ["llama", "bart"])
def test_eos_stops_each_row_and_is_not_returned(name, num_beams):
    model = BUILDERS[name]()
    ids, mask = inputs(name)
    settings = {"max_new_tokens": 10, "num_beams": num_beams, "length_penalty": 0.0}
    full = run(model, ids, mask, **settings)  # length_penalty 0: short hypotheses win
    eos = likely_eos(model, ids, mask, num_beams)
    cut = run(model, ids, mask, eos=eos, **settings)
    assert all(eos not in row for row in cut)
    assert any(len(row) < 10 for row in cut)
    if num_beams == 1:  # greedy: exactly the full run cut at the first EOS
        assert cut == [row[: row.index(eos)] if eos in row else row for row in full]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_loop_ends_as_soon_as_every_row_has_ended(num_beams):
    model = tiny_llama()
    eos = 17
    model.lm_head.register_forward_hook(lambda _m, _i, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 100.0)))  # fmt: skip
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ids, mask = inputs("llama")
    assert run(model, ids, mask, eos=[UNUSED_EOS, eos], num_beams=num_beams) == [[]] * len(PROMPTS)
    # greedy: the prefill only; beams: one more step fills the other K-1 finished slots
    assert len(calls) == (1 if num_beams == 1 else 2)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
def test_prefix_seeded_in_cache_equals_concatenated(builder, num_beams):
    model = builder()
    prefix = PrefixKV.stack(prefixes(model, (3, 5, 2)), rows=torch.tensor([2, 0, 1, 1]))
    ids, mask = inputs("gpt2")
    seeded = run(model, ids, mask, prefix, num_beams=num_beams, in_cache=True)
    assert seeded == run(model, ids, mask, prefix, num_beams=num_beams, in_cache=False)
    assert seeded == run(model, ids, mask, prefix, num_beams=num_beams)  # the default seeds


@pytest.mark.parametrize("num_beams", [1, 3])
def test_infix_of_real_words_equals_the_words_in_the_prompt(num_beams):
    """A prompt [x; INFIX; s] with the infix = the K/V of words w inside [x; w] generates what
    the plain model generates after [x; w; s]: x does not see the infix, s and the new tokens do,
    and their positions shift by the infix length."""
    model = tiny_llama()
    build_encoder(model, PrefixConfig(length=1))
    words, sep = [[40, 41, 42], [43, 44]], 3
    infixes = []
    for prompt, w in zip(PROMPTS[:2], words, strict=True):
        capture = KVCapture()
        model(torch.tensor([prompt + w]), prefix_kv=capture)
        span = slice(len(prompt), len(prompt) + len(w))
        infixes.append({"self": torch.stack([torch.stack([k[0, :, span], v[0, :, span]]) for _, (k, v)
                        in sorted(capture.records.items(), key=lambda item: item[0].layer)])})  # fmt: skip
    ids, mask = inputs("llama", [p + [sep] for p in PROMPTS[:2]])
    infix = PrefixKV.stack(infixes, rows=torch.tensor([0, 1]))
    infix = dataclasses.replace(infix, visible_from=torch.full((2,), ids.shape[1] - 1))
    plain = inputs("llama", [p + w + [sep] for p, w in zip(PROMPTS[:2], words, strict=True)])
    expected = run(model, *plain, num_beams=num_beams)
    assert run(model, ids, mask, infix, num_beams=num_beams) == expected


def test_encoder_output_is_used_once_and_equals_its_baked_prefix():
    model = tiny_gpt2()
    encoder = build_encoder(model, PrefixConfig(length=3))  # MLP reparameterisation
    ids, mask = inputs("gpt2")
    live = encoder()
    assert live.kv["self"].requires_grad
    assert run(model, ids, mask, live) == run(model, ids, mask, PrefixKV.stack([encoder.bake()]))
    assert all(p.grad is None for p in encoder.parameters())


def test_generation_works_with_gradient_checkpointing_enabled():
    model = tiny_llama()
    encoder = build_encoder(model, PrefixConfig(length=3))
    ids, mask = inputs("llama")
    before = run(model, ids, mask, encoder(), num_beams=2)
    enable_gradient_checkpointing(model)  # sets layer.training, which would disable the cache
    assert run(model, ids, mask, encoder(), num_beams=2) == before
    assert any(m.training for m in model.modules())  # flags restored for training


def test_left_pad_and_input_errors():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=9)
    assert ids.tolist() == [[4, 5, 6], [9, 9, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    model = tiny_gpt2()
    right = torch.tensor([[4, 5, 6], [7, 9, 9]])
    with pytest.raises(ValueError, match="left-padded"):
        run(model, right, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    with pytest.raises(ConfigError, match="num_beams"):
        run(model, ids, mask, do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="prefix.rows"):
        run(model, ids, mask, PrefixKV.stack(prefixes(model, (2,)), rows=torch.tensor([0])))
    assert run(model, ids[:0], mask[:0]) == []


@pytest.mark.slow  # inductor compiles C++ for a minute or more
@pytest.mark.parametrize("name", ["llama", "bart"])  # seeded cache + packed prefill; enc-dec
def test_compiled_decoding_gives_the_same_tokens(name):
    from torch._dynamo.utils import counters

    model = BUILDERS[name]()
    stack, order = prefixes(model, (3, 5, 2)), [2, 0, 1, 0]
    prefix = PrefixKV.stack(stack, rows=torch.tensor(order))
    ids, mask = inputs(name)
    probe = run(model, ids, mask, prefix)
    # EOS = a token some rows produce and others never do, so the batch shrinks (tiny BART
    # decodes the same tokens in every row: there all rows run to the end)
    eos = next((t for row in probe for t in row if not all(t in r for r in probe)), UNUSED_EOS)
    eager = run(model, ids, mask, prefix, eos=eos)
    assert name == "bart" or len({len(row) for row in eager}) > 1
    counters.clear()
    assert run(model, ids, mask, prefix, eos=eos, compile=True) == eager
    assert counters["stats"]["unique_graphs"] > 0  # the forward really ran compiled
