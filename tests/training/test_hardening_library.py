"""Issue 19, library and training: token-capped epochs, infixes on sliding-window layers,
positions past the model's limit, empty prompts, effective CLI defaults and file modes."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest
import torch

from prefixtune.cli.main import build_parser
from prefixtune.config import ConfigError, GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.artifact import FoldedPrefix
from prefixtune.core.atomic_files import atomic_write_dir, atomic_write_json, atomic_write_text
from prefixtune.core.prefix_encoder import build_encoder
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.records import Example
from prefixtune.evaluation.predictor import Predictor
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad
from prefixtune.methods.modules import infix_prompt_inputs, place_infix
from prefixtune.methods.registry import build_method
from prefixtune.training.trainer import Trainer

from conftest import TOKENIZER_VOCAB, VOCAB, tiny_gemma3, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

UNUSED_EOS = VOCAB - 1
WORDS = ["name", "food", "area", "price", "near", "family", "rating", "eat", "type", "customer"]


# ----------------------------------------------------------------------------- item 1


def varied_examples(n: int, seed: int = 1) -> list[Example]:
    """Sources of 1-12 words: token-capped batches of them differ in number between epochs."""
    rng = random.Random(seed)
    return [Example(" ".join(rng.choices(WORDS, k=rng.randint(1, 12))), "ok") for _ in range(n)]


def capped_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(out=str(tmp_path / "run"), batch_size=2, max_batch_tokens=70, epochs=2,
                  lr=1e-3, dev_size=0, progress=False, log_every=1, seed=3,
                  max_source_tokens=24, max_target_tokens=4)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def capped_trainer(tmp_path, tokenizer, data, **overrides) -> Trainer:
    return Trainer(capped_config(tmp_path, **overrides), PrefixConfig(length=2, mlp_hidden=8),
                   model=tiny_gpt2(TOKENIZER_VOCAB), tokenizer=tokenizer, train_examples=data,
                   dev_examples=data[:2])  # fmt: skip


def test_token_capped_batches_number_each_epoch_on_its_own(tmp_path, bpe_tokenizer):
    """Micro-batch m of the run: epoch after epoch, each epoch's own (differing) batch count,
    every example exactly once per epoch; fractional epochs take a share of the last one."""
    data = varied_examples(105)
    batches = capped_trainer(tmp_path, bpe_tokenizer, data, max_batch_tokens=60).batches
    batches.collate = list  # the items themselves
    index = {id(item): i for i, item in enumerate(batches.items)}
    counts = [batches.start(e + 1) - batches.start(e) for e in range(4)]
    assert len(set(counts)) > 1  # the token cap makes the epochs differ, as this test needs
    flat = [index[id(it)] for m in range(batches.total(4)) for it in batches.get(m)]
    assert len(flat) == 4 * len(data)
    for epoch in range(4):
        assert sorted(flat[epoch * len(data) : (epoch + 1) * len(data)]) == list(range(len(data)))
    assert batches.total(1.5) == counts[0] + -(-counts[1] // 2)
    assert [batches.epoch_of(batches.start(e)) for e in range(4)] == [0, 1, 2, 3]


def test_token_capped_training_sees_every_example_once_per_epoch_and_ends_the_schedule(
    tmp_path, bpe_tokenizer
):
    """--max-batch-tokens with --grad-accum 2 over 2 epochs whose batch counts differ: every
    example is trained on once per epoch (no crash, nothing skipped; a step may span two
    epochs and the last one may hold a single micro-batch), the dev loss is taken at each
    epoch's end, and the learning rate reaches zero exactly at the last step."""
    epochs, accum, data = 2, 2, varied_examples(105)
    trainer = capped_trainer(tmp_path, bpe_tokenizer, data, grad_accum=accum, epochs=epochs)
    index = {id(item): i for i, item in enumerate(trainer.batches.items)}
    seen: list[list[int]] = []  # the example indices of every micro-batch, in training order
    collate = trainer.batches.collate

    def recording(items):
        seen.append([index[id(item)] for item in items])
        return collate(items)

    trainer.batches.collate = recording
    summary = trainer.fit()

    flat = [i for batch in seen for i in batch]
    assert len(flat) == epochs * len(data)
    for epoch in range(epochs):
        assert sorted(flat[epoch * len(data) : (epoch + 1) * len(data)]) == list(range(len(data)))
    rows = torch.tensor([len(batch) for batch in seen]).cumsum(0).tolist()
    ends = [rows.index(e * len(data)) + 1 for e in range(1, epochs + 1)]  # batches per epoch end
    assert ends[0] * 2 != ends[1]  # the epochs differ in batches (epoch 0 alone set the count)
    steps = -(-len(seen) // accum)
    assert summary["steps"] == steps
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if "lr" in r]
    assert len(lrs) == steps and lrs[-1] == 0.0 and lrs[-2] > 0.0
    dev_steps = [r["step"] for r in log if "dev_loss" in r]
    assert dev_steps == [0] + [-(-end // accum) for end in ends]


# ----------------------------------------------------------------------------- item 2


def recompute_infix_greedy(model, prompt: list[int], infix, steps: int) -> list[int]:
    """Greedy decoding without a cache: [prompt; new] with the infix before the last prompt
    token, recomputed in full every step."""
    out: list[int] = []
    for _ in range(steps):
        ids = torch.tensor([prompt + out])
        mask = torch.ones_like(ids)
        placed, positions = place_infix(infix, mask, torch.tensor([len(prompt) - 1]))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           prefix_kv=placed, use_cache=False).logits  # fmt: skip
        out.append(int(logits[0, -1].argmax()))
    return out


def test_infix_on_sliding_window_layers_cached_decoding_equals_recompute():
    """Gemma-3 with a 4-token window and prompts longer than it: the infix stays visible in the
    sliding layers while decoding from the cache (each step equals a full recompute)."""
    model = tiny_gemma3(sliding_window=4)
    method = build_method("infix", model, None, PrefixConfig(length=3, reparam=False))
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.mul_(30)  # an infix strong enough to change the greedy tokens
        infix = method.prefix_kv()
    prompts = [list(range(5, 14)), list(range(20, 27))]  # 9 and 7 tokens; window 4
    ids, mask = left_pad(prompts, 0)
    config = GenerateConfig(max_new_tokens=6)
    placed, _ = infix_prompt_inputs(infix, mask)
    got = generate(model, ids, mask, placed, config, eos_token_id=UNUSED_EOS, pad_token_id=0)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == recompute_infix_greedy(model, prompt, infix, steps=6)
    plain = generate(model, ids, mask, None, config, eos_token_id=UNUSED_EOS, pad_token_id=0)
    assert plain != got  # the infix matters in this test


# ----------------------------------------------------------------------------- item 3


def test_generate_refuses_positions_past_the_model_limit():
    model = tiny_gpt2()  # 128 positions
    prefix = build_encoder(model, PrefixConfig(length=20, reparam=False))()
    ids, mask = left_pad([[3 + i % 90 for i in range(n)] for n in (87, 100)], 0)
    config = GenerateConfig(max_new_tokens=16)
    with pytest.raises(ConfigError, match=r"row 1.*100 tokens.*prefix of 20.*16.*128 positions"):
        generate(model, ids, mask, prefix, config, eos_token_id=UNUSED_EOS, pad_token_id=0)
    short = GenerateConfig(max_new_tokens=8)  # 100 + 20 + 8 = 128 fits
    assert len(generate(model, ids, mask, prefix, short, eos_token_id=UNUSED_EOS,
                        pad_token_id=0)[1]) == 8  # fmt: skip


def test_training_refuses_examples_past_the_model_limit(tmp_path, bpe_tokenizer):
    """A prefix of 80 positions + examples of up to 72 tokens do not fit GPT-2's 128: the error
    comes while preparing the data and names the example, its length, P and the limit."""
    config = TrainConfig(out=str(tmp_path / "run"), batch_size=4, max_steps=2, dev_size=0,
                         progress=False, max_source_tokens=48, max_target_tokens=24)  # fmt: skip
    data = builtin_examples("train")[:8]
    with pytest.raises(ConfigError, match=r"training example \d+ .*\d+ tokens.*prefix of 80.*128"):
        Trainer(config, PrefixConfig(length=80, mlp_hidden=8), model=tiny_gpt2(TOKENIZER_VOCAB),
                tokenizer=bpe_tokenizer, train_examples=data, dev_examples=[])  # fmt: skip


def test_evaluation_refuses_inputs_past_the_model_limit(bpe_tokenizer):
    model = tiny_gpt2(TOKENIZER_VOCAB)
    encoder = build_encoder(model, PrefixConfig(length=30, reparam=False))
    folded = FoldedPrefix(kv=encoder.bake(), meta={})
    predictor = Predictor(model, bpe_tokenizer, folded, max_source_tokens=200)
    sources = ["name : The Eagle", " ".join(WORDS * 8)]
    with pytest.raises(ConfigError, match=r"input 2 .*tokens.*prefix of 30.*128 positions"):
        predictor.predict(sources, GenerateConfig(max_new_tokens=8))


# ----------------------------------------------------------------------------- item 4


def test_empty_prompts_get_one_clear_error_naming_the_row():
    model = tiny_gpt2()
    config = GenerateConfig(max_new_tokens=2)
    for prompts, row in (([[], []], 0), ([[5, 6], []], 1)):
        ids, mask = left_pad(prompts, 0)
        with pytest.raises(ValueError, match=rf"row {row} .*empty"):
            generate(model, ids, mask, None, config, eos_token_id=UNUSED_EOS, pad_token_id=0)


# ----------------------------------------------------------------------------- item 5


def _help_of(parser, command: str, flag: str) -> str:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    action = next(a for a in sub._actions if flag in a.option_strings)
    return action.help


def test_evaluate_help_states_the_preset_defaults():
    parser = build_parser()
    assert "(default: 5" in _help_of(parser, "evaluate", "--num-beams")
    assert "table-to-text" in _help_of(parser, "evaluate", "--num-beams")
    assert "(default: 1" in _help_of(parser, "generate", "--num-beams")  # greedy preset
    assert "(default: 64" in _help_of(parser, "evaluate", "--max-new-tokens")  # not in presets


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_and_directories_follow_the_umask(tmp_path, umask_027):
    text = atomic_write_text(tmp_path / "a.txt", "x")
    data = atomic_write_json(tmp_path / "b.json", {"a": 1})
    folder = atomic_write_dir(tmp_path / "dir", lambda d: (d / "f").write_text("y"))
    assert stat.S_IMODE(text.stat().st_mode) == 0o640
    assert stat.S_IMODE(data.stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
