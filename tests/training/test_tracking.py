"""--report-to tensorboard: the event files hold what log.jsonl holds, read back with
TensorBoard's own reader; a resumed run appends without showing a step twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.data.builtin import builtin_examples
from prefixtune.training.tracking import Tracker, scalars
from prefixtune.training.trainer import Trainer

from conftest import TOKENIZER_VOCAB, tiny_gpt2

TAGS = ("loss", "lr", "tokens_per_s", "dev_loss")


def _trainer(out: Path, tokenizer, **overrides) -> Trainer:
    torch.manual_seed(0)
    values = dict(out=str(out), batch_size=4, lr=5e-3, max_steps=6, dev_size=0, progress=False,
                  log_every=1, seed=3, eval_every=2, warmup_steps=2, max_source_tokens=48,
                  max_target_tokens=24, report_to="tensorboard")  # fmt: skip
    config = TrainConfig(**{**values, **overrides})
    return Trainer(config, PrefixConfig(length=3, mlp_hidden=16), model=tiny_gpt2(TOKENIZER_VOCAB),
                   tokenizer=tokenizer, train_examples=builtin_examples("train")[:20],
                   dev_examples=builtin_examples("dev")[:8])  # fmt: skip


def _events(out: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard reads the run's event files."""
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}  # fmt: skip


def _logged(out: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from log.jsonl, the last line of a step winning (as a resume
    re-logs the steps after its checkpoint)."""
    latest: dict[str, dict[int, float]] = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int):
                latest.setdefault(key, {})[record["step"]] = float(value)
    return {key: sorted(steps.items()) for key, steps in latest.items()}


def _assert_same(events, logged) -> None:
    assert set(events) == set(logged) == set(TAGS)
    for tag in TAGS:
        assert [s for s, _ in events[tag]] == [s for s, _ in logged[tag]], tag
        # event files hold float32 scalars
        expected = [torch.tensor(v, dtype=torch.float32).item() for _, v in logged[tag]]
        assert [v for _, v in events[tag]] == expected, tag


def test_tensorboard_scalars_equal_log_jsonl(tmp_path, bpe_tokenizer):
    out = tmp_path / "run"
    _trainer(out, bpe_tokenizer).fit()
    logged = _logged(out)
    assert [s for s, _ in logged["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in logged["dev_loss"]] == [0, 2, 4, 6]
    _assert_same(_events(out), logged)


def test_a_resumed_run_appends_and_no_step_shows_twice(tmp_path, bpe_tokenizer, monkeypatch):
    out = tmp_path / "run"
    crashing = _trainer(out, bpe_tokenizer, checkpoint_every=3)
    original_step = crashing._train_step

    def crash_at_step_5(step):
        if step == 4:  # after the step-3 checkpoint and step 4's log line
            raise KeyboardInterrupt
        return original_step(step)

    monkeypatch.setattr(crashing, "_train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    before = _events(out)  # closed on the way out: every record so far is on disk
    assert [s for s, _ in before["loss"]] == [1, 2, 3, 4]
    _trainer(out, bpe_tokenizer, checkpoint_every=3, resume=True).fit()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 4, 5, 6]  # step 4 re-logged
    events = _events(out)
    assert [s for s, _ in events["loss"]] == [1, 2, 3, 4, 5, 6]
    _assert_same(events, _logged(out))


def test_report_to_none_writes_no_event_files(tmp_path, bpe_tokenizer):
    out = tmp_path / "run"
    _trainer(out, bpe_tokenizer, max_steps=2, report_to="none").fit()
    assert (out / "log.jsonl").exists() and not (out / "tensorboard").exists()


def test_only_the_writing_process_tracks(tmp_path):
    tracker = Tracker("tensorboard", tmp_path, enabled=False)  # a rank other than 0
    tracker.log({"step": 1, "loss": 2.0})
    tracker.close()
    assert not (tmp_path / "tensorboard").exists()


def test_unknown_tracker_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--report-to must be one of none, tensorboard"):
        TrainConfig(report_to="wandb")
    with pytest.raises(ConfigError, match="--report-to"):
        Tracker("mlflow", "runs/x")


def test_scalars_are_the_numbers_of_a_record_but_its_step():
    record = {"step": 3, "loss": 1.5, "tokens": 7, "stopped": "no dev improvement",
              "early": True, "task": {"e2e": 0.5}}  # fmt: skip
    assert dict(scalars(record)) == {"loss": 1.5, "tokens": 7.0, "task/e2e": 0.5}
