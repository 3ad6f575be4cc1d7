"""The training loop on tiny models: loss masking, learning, checkpoints and bit-exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.core.artifact import load_encoder, load_prefix
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import collate, collate_seq2seq, encode
from prefixtune.methods.objective import hidden_states, target_loss
from prefixtune.training.trainer import Trainer, train

from conftest import TOKENIZER_VOCAB, tiny_bart, tiny_gpt2, tiny_llama

LIMITS = {"max_source_tokens": 48, "max_target_tokens": 24}


def examples(n, split="train"):
    return builtin_examples(split)[:n]


def run_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(out=str(tmp_path / "run"), batch_size=4, lr=5e-3, max_steps=6, dev_size=0,
                  progress=False, log_every=1, seed=3, **LIMITS)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
def test_target_only_loss_equals_hf_loss_over_full_logits(builder, bpe_tokenizer):
    model = builder(TOKENIZER_VOCAB)
    items, _ = encode(examples(6), bpe_tokenizer, encoder_decoder=False, **LIMITS)
    batch = collate(items, bpe_tokenizer.pad_token_id)
    ours = target_loss(model, hidden_states(model, batch), batch["labels"])
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_target_only_loss_equals_hf_loss_for_bart(bpe_tokenizer):
    model = tiny_bart(TOKENIZER_VOCAB)
    model.config.pad_token_id = bpe_tokenizer.pad_token_id
    items, _ = encode(examples(6), bpe_tokenizer, encoder_decoder=True, **LIMITS)
    batch = collate_seq2seq(items, bpe_tokenizer.pad_token_id)
    ours = target_loss(model, hidden_states(model, batch), batch["labels"])
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_bart])
def test_training_lowers_the_dev_loss_and_writes_outputs(builder, tmp_path, bpe_tokenizer):
    model = builder(TOKENIZER_VOCAB)
    config = run_config(tmp_path, max_steps=25, lr=5e-2)
    summary = train(config, PrefixConfig(length=4, mlp_hidden=32), model=model,
                    tokenizer=bpe_tokenizer, train_examples=examples(24),
                    dev_examples=examples(24))  # fmt: skip
    # a frozen random tiny model sits near uniform (ln 320 = 5.77); the prefix moves it a little
    assert summary["final_dev_loss"] < summary["initial_dev_loss"] - 0.05
    out = tmp_path / "run"
    run = json.loads((out / "run.json").read_text())
    assert run["trainable_parameters"] == summary["trainable_parameters"] > 0
    assert run["data_hash"] and run["versions"]["torch"] == torch.__version__
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 26))
    assert all(r["tokens_per_s"] > 0 for r in lines if "loss" in r)
    best = min(r["dev_loss"] for r in lines if "dev_loss" in r)
    assert load_prefix(out / "prefix").meta["dev_loss"] == pytest.approx(best)


def _trainer(tmp_path, name, tokenizer, **overrides) -> Trainer:
    torch.manual_seed(0)  # the same frozen base for every run
    config = run_config(tmp_path / name, max_steps=6, warmup_steps=2, **overrides)
    return Trainer(config, PrefixConfig(length=3, mlp_hidden=16), model=tiny_llama(TOKENIZER_VOCAB),
                   tokenizer=tokenizer, train_examples=examples(20), dev_examples=[])  # fmt: skip


def test_resume_after_a_crash_is_bit_exact(tmp_path, bpe_tokenizer, monkeypatch):
    _trainer(tmp_path, "straight", bpe_tokenizer).fit()
    crashing = _trainer(tmp_path, "resumed", bpe_tokenizer, checkpoint_every=3)
    original_step = crashing._train_step

    def crash_at_step_4(step):
        if step == 4:
            raise KeyboardInterrupt  # after the step-3 checkpoint, mid-way through step 5
        return original_step(step)

    monkeypatch.setattr(crashing, "_train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    before_crash = crashing.state["seconds"]  # recorded with the step-3 checkpoint
    summary = _trainer(tmp_path, "resumed", bpe_tokenizer, checkpoint_every=3, resume=True).fit()
    assert summary["seconds"] > before_crash > 0  # run.json counts the time before the crash too
    straight = load_encoder(tmp_path / "straight" / "run" / "checkpoint")
    resumed = load_encoder(tmp_path / "resumed" / "run" / "checkpoint")
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(load_prefix(tmp_path / "straight" / "run" / "prefix").kv["self"],
                       load_prefix(tmp_path / "resumed" / "run" / "prefix").kv["self"])  # fmt: skip


def test_existing_checkpoint_is_never_overwritten_without_resume(tmp_path, bpe_tokenizer):
    kwargs = dict(model=tiny_gpt2(TOKENIZER_VOCAB), tokenizer=bpe_tokenizer,
                  train_examples=examples(8), dev_examples=[])  # fmt: skip
    train(run_config(tmp_path, max_steps=1), PrefixConfig(length=2), **kwargs)
    with pytest.raises(ConfigError, match="--resume"):
        train(run_config(tmp_path, max_steps=2), PrefixConfig(length=2), **kwargs)


def test_bad_train_config_names_the_flag():
    with pytest.raises(ConfigError, match="--batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=-1)


def test_patience_stops_after_evaluations_without_improvement_and_keeps_the_best(
    tmp_path, bpe_tokenizer, monkeypatch
):
    scripted = iter(
        [3.0, 2.0, 1.0, 1.5, 1.6, 0.5, 0.4, 0.45, 0.6, 0.7, 0.8]
    )  # initial, every 2 steps

    def dev_loss(*args) -> float:
        return next(scripted)

    monkeypatch.setattr("prefixtune.training.trainer.dev_loss", dev_loss)
    config = run_config(tmp_path, max_steps=20, eval_every=2, patience=2)
    summary = train(config, PrefixConfig(length=2), model=tiny_gpt2(TOKENIZER_VOCAB),
                    tokenizer=bpe_tokenizer, train_examples=examples(8),
                    dev_examples=examples(4))  # fmt: skip
    assert summary["stopped_early_at"] == 8  # evaluations at 2 (2.0), 4 (1.0), 6 and 8 (worse)
    assert (summary["best_dev_loss"], summary["final_dev_loss"]) == (1.0, 1.6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines if "loss" in r) == 8
    assert load_prefix(tmp_path / "run" / "prefix").meta["step"] == 4
    kwargs = dict(model=tiny_gpt2(TOKENIZER_VOCAB), tokenizer=bpe_tokenizer,
                  train_examples=examples(8), dev_examples=examples(4))  # fmt: skip
    again = train(dataclasses.replace(config, resume=True), PrefixConfig(length=2), **kwargs)
    assert again["stopped_early_at"] == 8 and again["best_dev_loss"] == 1.0  # trains no more
    more = train(dataclasses.replace(config, resume=True, patience=0), PrefixConfig(length=2),
                 **kwargs)  # fmt: skip
    assert more["stopped_early_at"] is None and more["best_dev_loss"] == 0.4  # at step 12
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][8:] == list(range(9, 21))  # went on from 8


@pytest.mark.slow  # inductor compiles C++ for a minute or more
def test_compiled_training_matches_eager(tmp_path, bpe_tokenizer):
    """--compile changes kernels, not results: the same prefix after the same steps."""
    trainers = {}
    for name, flag in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        config = run_config(tmp_path / name, max_steps=2, compile=flag, autocast="float32")
        trainers[name] = Trainer(config, PrefixConfig(length=3, mlp_hidden=16),
                                 model=tiny_gpt2(TOKENIZER_VOCAB), tokenizer=bpe_tokenizer,
                                 train_examples=examples(8), dev_examples=[])  # fmt: skip
        trainers[name].fit()
    assert trainers["compiled"].loss is not trainers["compiled"].method.loss  # really compiled
    eager = load_prefix(tmp_path / "eager" / "run" / "prefix").kv["self"]
    compiled = load_prefix(tmp_path / "compiled" / "run" / "prefix").kv["self"]
    assert torch.allclose(eager, compiled, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_values", [100, 2**18])  # chunks of 2 rows, or all 7 at once
def test_cross_entropy_equals_torch_in_value_and_gradient(reduction, chunk_values, monkeypatch):
    from prefixtune.methods import objective
    from prefixtune.methods.objective import TargetCrossEntropy

    monkeypatch.setattr(objective, "CE_CHUNK_VALUES", chunk_values)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=generator)
    head = torch.randn(16, 50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    grads = []
    for ours in (True, False):
        head.grad = None
        logits = hidden @ head  # (N, V), an intermediate as the LM head's output is
        if ours:
            loss = TargetCrossEntropy.apply(logits, targets, reduction == "mean")
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction=reduction)
        (loss * 0.37 / 3).backward()  # as the trainer weights and accumulates it
        grads.append((loss.detach(), head.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
