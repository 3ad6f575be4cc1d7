"""Property-based tests (hypothesis) of the generation invariants over random prompt lengths,
padding, prefix lengths, per-row prefix choices, EOS steps, beam settings and architectures:

- a mixed batch generates, row by row, what each row generates alone;
- a packed prefill leaves the state (logits, masks, positions, cache) a padded prefill leaves;
- cached decoding equals recomputing the whole sequence every step;
- beam search equals transformers' beam search on [w; x], the prefix being the model's own
  keys/values of w (BART: the same random prefix passed through transformers' generate).

Each tiny model is built once per architecture; examples are derandomized (reproducible in CI).
"""

from __future__ import annotations

import copy
import functools
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor

import prefixtune.generation.prefill as generation
from prefixtune.config import GenerateConfig
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.prefix_encoder import capture_kv, model_shapes
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad, prefill_decoder

from conftest import BUILDERS, DECODER_ONLY, VOCAB, assert_same_prefill_state, tiny_gemma3

PAD = 0
BART_PAD = 1
UNUSED_EOS = VOCAB - 1  # the seeded tiny models do not produce it: rows run to the end
ARCHS = ("gpt2", "llama", "gemma3", "bart")
PROPERTY = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written to .hypothesis/: every run draws the same examples
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@functools.cache
def models(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model with prefixtune attention, untouched copy with transformers' own attention).

    'gemma3-wide': Gemma-3 with a window wider than any sequence here, for [w; x] equality
    (beyond the window a prefix stays visible while the plain model's words slide out)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_gemma3(sliding_window=64) if arch == "gemma3-wide" else BUILDERS[arch]()
    pristine = copy.deepcopy(model)
    enable_prefixes(model)
    return model, pristine


def random_prefix(model, length: int, seed: int) -> dict[str, Tensor]:
    """kind -> (L, 2, H_kv, P, D) random keys/values, of the size real keys have."""
    generator = torch.Generator().manual_seed(seed)
    return {
        kind: torch.randn(s.layers, 2, s.heads, length, s.head_dim, generator=generator)
        for kind, s in model_shapes(model).items()
    }


def batch_inputs(arch: str, prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Left padding for decoder-only models, right padding for BART's encoder."""
    if arch in DECODER_ONLY or arch == "gemma3-wide":
        return left_pad(prompts, PAD)
    width = max(map(len, prompts))
    ids = torch.tensor([p + [BART_PAD] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    return ids, mask


def run(arch, prompts, prefix, eos=UNUSED_EOS, **config) -> list[list[int]]:
    model, _ = models(arch)
    ids, mask = batch_inputs(arch, prompts)
    config = GenerateConfig(**config)
    with torch.inference_mode():
        return generate(model, ids, mask, prefix, config, eos_token_id=eos, pad_token_id=PAD)


def pick_eos(data, probe: list[list[int]]) -> int:
    """A token the run produces (so EOS ends rows mid-way), or, now and then, none."""
    produced = sorted({t for row in probe for t in row})
    return data.draw(st.sampled_from([*produced, UNUSED_EOS]), label="eos")


def describe(arch, outputs, new, prompts, prefixes=()) -> None:
    """Record what an example covered (shown by pytest --hypothesis-show-statistics)."""
    event(f"arch {arch}")
    event("EOS ended a row early" if any(len(r) < new for r in outputs) else "no early EOS")
    event("padded batch" if len({len(p) for p in prompts}) > 1 else "no padding")
    if len({next(iter(p.values())).shape[-2] for p in prefixes}) > 1:
        event("prefixes of different lengths")
    if arch == "gemma3" and max(map(len, prompts)) + new > 4:
        event("gemma3 past its sliding window")


tokens = st.integers(3, VOCAB - 2)  # no pad, BOS or the unused EOS inside prompts


@st.composite
def mixed_batch(draw, arch: str, max_prompt: int = 7, max_rows: int = 4):
    """Prompts, distinct prefixes of random lengths, and which prefix each row uses."""
    model, _ = models(arch)
    rows = draw(st.integers(1, max_rows), label="rows")
    prompts = draw(
        st.lists(st.lists(tokens, min_size=1, max_size=max_prompt), min_size=rows, max_size=rows),
        label="prompts",
    )
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label="prefix lengths")
    seed = draw(st.integers(0, 2**16), label="prefix seed")
    prefixes = [random_prefix(model, n, seed + i) for i, n in enumerate(lengths)]
    order = draw(st.lists(st.integers(0, len(lengths) - 1), min_size=rows, max_size=rows))
    return prompts, prefixes, order


@pytest.mark.parametrize("arch", ARCHS)
@PROPERTY
@given(data=st.data(), beams=st.sampled_from([1, 1, 2, 3]), new=st.integers(1, 6))
def test_mixed_batch_equals_each_row_alone(data, arch, beams, new):
    prompts, prefixes, order = data.draw(mixed_batch(arch), label="batch")
    prefix = PrefixKV.stack(prefixes, rows=torch.tensor(order))
    settings_ = {"max_new_tokens": new, "num_beams": beams}
    eos = pick_eos(data, run(arch, prompts, prefix, **settings_))
    batch = run(arch, prompts, prefix, eos, **settings_)
    describe(arch, batch, new, prompts, prefixes)
    for i, prompt in enumerate(prompts):
        alone = run(arch, [prompt], PrefixKV.stack([prefixes[order[i]]]), eos, **settings_)
        assert batch[i] == alone[0], f"row {i}"


def packed_or_padded(arch: str, prompts, prefix, pack: bool):
    model, _ = models(arch)
    ids, mask = left_pad(prompts, PAD)
    with mock.patch.object(generation, "packing_pays", lambda *args: pack), torch.inference_mode():
        return prefill_decoder(model, ids, mask, prefix, 4, None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@PROPERTY
@given(data=st.data(), with_prefix=st.booleans())
def test_packed_prefill_leaves_the_state_of_a_padded_prefill(data, arch, with_prefix):
    prompts, prefixes, order = data.draw(mixed_batch(arch, max_prompt=8, max_rows=5))
    prefix = PrefixKV.stack(prefixes, rows=torch.tensor(order)) if with_prefix else None
    padded, padded_logits = packed_or_padded(arch, prompts, prefix, pack=False)
    packed, packed_logits = packed_or_padded(arch, prompts, prefix, pack=True)
    assert_same_prefill_state(packed, packed_logits, padded, padded_logits)


def recompute_greedy(arch: str, prompt: list[int], prefix, steps: int, eos: int) -> list[int]:
    """Greedy decoding of one row without any cache: the whole sequence every step."""
    model, _ = models(arch)
    out: list[int] = []
    for _ in range(steps):
        if model.config.is_encoder_decoder:
            ids = torch.tensor([prompt])
            start = model.config.decoder_start_token_id
            extra = {"decoder_input_ids": torch.tensor([[start, *out]])}
        else:
            ids, extra = torch.tensor([prompt + out]), {}
        with torch.inference_mode():
            logits = prefixed_forward(model, ids, torch.ones_like(ids), prefix, use_cache=False,
                                      **extra).logits  # fmt: skip
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@PROPERTY
@given(data=st.data(), new=st.integers(1, 7))
def test_cached_decoding_equals_recomputing_every_step(data, arch, new):
    """Gemma-3's window is 4: prompts up to 9 tokens and 7 new ones run well past it."""
    prompts, prefixes, order = data.draw(mixed_batch(arch, max_prompt=9), label="batch")
    prefix = PrefixKV.stack(prefixes, rows=torch.tensor(order))
    eos = pick_eos(data, run(arch, prompts, prefix, max_new_tokens=new))
    cached = run(arch, prompts, prefix, eos, max_new_tokens=new)
    describe(arch, cached, new, prompts, prefixes)
    for i, prompt in enumerate(prompts):
        alone = PrefixKV.stack([prefixes[order[i]]])
        assert cached[i] == recompute_greedy(arch, prompt, alone, new, eos), f"row {i}"


def transformers_beams(arch, prompts, eos, prefix=None, **settings_) -> list[list[int]]:
    """transformers' own beam search; new tokens up to (not including) the first EOS."""
    model, pristine = models(arch)
    ids, mask = batch_inputs(arch, prompts)
    extra = {}
    if prefix is not None:  # BART: carry the prefix through transformers' generate
        pristine, extra = model, {"prefix_kv": prefix}
    with mock.patch.object(pristine, "_validate_model_kwargs", lambda kwargs: None):
        out = pristine.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=0,
            eos_token_id=eos, pad_token_id=PAD, **settings_, **extra,
        )  # fmt: skip
    start = 1 if model.config.is_encoder_decoder else ids.shape[1]
    rows = [row[start:].tolist() for row in out]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3-wide", "bart"])
@PROPERTY
@given(
    data=st.data(),
    beams=st.integers(2, 4),
    new=st.integers(1, 7),
    length_penalty=st.sampled_from([0.0, 0.8, 1.0, 2.0]),
    early_stopping=st.booleans(),
)
def test_beam_search_equals_transformers_on_words_then_prompt(
    data, arch, beams, new, length_penalty, early_stopping
):
    model, _ = models(arch)
    rows = data.draw(st.integers(1, 3), label="rows")
    prompt_lists = st.lists(st.lists(tokens, min_size=1, max_size=5), min_size=rows, max_size=rows)
    prompts = data.draw(prompt_lists, label="prompts")
    settings_ = {"max_new_tokens": new, "num_beams": beams, "length_penalty": length_penalty,
                 "early_stopping": early_stopping}  # fmt: skip
    if model.config.is_encoder_decoder:  # one shared random prefix, in both searches
        length = data.draw(st.integers(1, 5), label="prefix length")
        prefix = PrefixKV.stack([random_prefix(model, length, seed=length)])
        eos = pick_eos(data, run(arch, prompts, prefix, **settings_))
        expected = transformers_beams(arch, prompts, eos, prefix, **settings_)
    else:  # the prefix holds the model's own keys/values of each row's words w
        words = data.draw(
            st.lists(st.lists(tokens, min_size=1, max_size=4), min_size=rows, max_size=rows),
            label="words",
        )
        captured = [capture_kv(model, torch.tensor([w])) for w in words]
        prefix = PrefixKV.stack(captured, rows=torch.arange(rows))
        eos = pick_eos(data, run(arch, prompts, prefix, **settings_))
        joined = [w + x for w, x in zip(words, prompts, strict=True)]
        expected = transformers_beams(arch, joined, eos, **settings_)
    ours = run(arch, prompts, prefix, eos, **settings_)
    describe(arch, ours, new, prompts)
    assert ours == expected
