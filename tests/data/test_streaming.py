"""StreamingBatches: the in-memory length bucketing over a bounded buffer, every example once per
pass, bounded memory, deterministic re-reads (resume), and streamed training runs."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.core.artifact import load_encoder
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import Batches, Encoded, encode, length_bucketed_batches
from prefixtune.data.streaming import SEED_STRIDE, StreamingBatches
from prefixtune.training.trainer import Trainer, train

from conftest import TOKENIZER_VOCAB, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITS = {"max_source_tokens": 48, "max_target_tokens": 24}
EXAMPLES = builtin_examples("train")[:60]


@pytest.fixture(scope="module")
def encoder(bpe_tokenizer):
    def run(examples):
        return encode(examples, bpe_tokenizer, encoder_decoder=False, **LIMITS)[0]

    return run


def keys(items: list[Encoded]) -> list[tuple[int, ...]]:
    """A batch as its rows' ids (what the tests compare; stands in for collate)."""
    return [tuple(it.input_ids) for it in items]


def streamed(encoder, buffer, examples=EXAMPLES, **kwargs) -> StreamingBatches:
    return StreamingBatches(lambda: iter(examples), encoder, keys, 4, seed=11, buffer=buffer,
                            **kwargs)  # fmt: skip


def test_one_buffer_gives_exactly_the_in_memory_batches(encoder):
    stream = streamed(encoder, buffer=len(EXAMPLES))
    memory = Batches(encoder(EXAMPLES), keys, 4, seed=11)
    assert stream.total(2.5) == memory.total(2.5) == 2 * memory.per_epoch + 8
    assert [stream.get(i) for i in range(stream.total(2.5))] == [
        memory.get(i) for i in range(memory.total(2.5))
    ]
    assert [stream.epoch_of(i) for i in range(40)] == [memory.epoch_of(i) for i in range(40)]
    assert stream.n_examples == len(EXAMPLES)


@pytest.mark.parametrize("max_tokens", [0, 150])
def test_every_example_once_per_pass_bucketed_within_its_buffer(encoder, max_tokens):
    buffer = 16
    stream = streamed(encoder, buffer, max_tokens=max_tokens)
    items = encoder(EXAMPLES)
    row_of = {tuple(it.input_ids): i for i, it in enumerate(items)}
    assert len(row_of) == len(items)  # the rows are told apart by their ids
    index = 0
    for epoch in range(2):
        rows = []
        while stream.epoch_of(index) == epoch:
            rows.append([row_of[r] for r in stream.get(index)])
            index += 1
        assert sorted(r for batch in rows for r in batch) == list(range(len(EXAMPLES)))
        # each buffer's batches are the in-memory bucketing of that buffer alone
        for k, start in enumerate(range(0, len(EXAMPLES), buffer)):
            part = items[start : start + buffer]
            mine = [b for b in rows if start <= b[0] < start + buffer]
            assert all(start <= r < start + buffer for b in mine for r in b)  # never mixed
            want = length_bucketed_batches([len(i.input_ids) + len(i.labels) for i in part], 4,
                                           seed=11 + epoch + SEED_STRIDE * k,
                                           max_tokens=max_tokens or None)  # fmt: skip
            assert mine == [[start + i for i in b] for b in want]


def test_memory_stays_within_the_buffer(encoder):
    pulled = 0

    def counting():
        nonlocal pulled
        for example in EXAMPLES:
            pulled += 1
            yield example

    buffer = 10
    stream = StreamingBatches(counting, encoder, keys, 3, seed=0, buffer=buffer)
    emitted = 0  # examples in the batches handed out before this one (over every pass)
    for i in range(30):  # a pass and a half
        batch = stream.get(i)
        assert 0 < pulled - emitted <= buffer  # held: read but not handed out before
        emitted += len(batch)
        if i == 0:
            assert pulled == buffer  # lazy: one buffer read, not the file
    assert pulled > len(EXAMPLES)  # the second pass re-read the stream
    assert stream.n_examples == len(EXAMPLES)


def test_a_fresh_reader_or_going_back_re_reads_the_same_batches(encoder):
    straight = streamed(encoder, buffer=16)
    seen = [straight.get(i) for i in range(50)]  # past the end of the first pass
    resumed = streamed(encoder, buffer=16)
    assert [resumed.get(i) for i in range(33, 50)] == seen[33:]  # skips to 33, deterministically
    assert straight.get(5) == seen[5] and straight.get(6) == seen[6]  # back: re-read
    assert straight.get(49) == seen[49]


def test_total_counts_one_pass_and_a_token_cap_needs_max_steps(encoder):
    stream = streamed(encoder, buffer=16)
    per = sum(-(-min(16, len(EXAMPLES) - s) // 4) for s in range(0, len(EXAMPLES), 16))
    assert stream.total(1) == per and stream.total(3) == 3 * per
    assert stream.epoch_of(per - 1) == 0 and stream.epoch_of(per) == 1
    with pytest.raises(ValueError, match="--max-steps"):
        streamed(encoder, buffer=16, max_tokens=100).total(1)
    with pytest.raises(ValueError, match="empty"):
        streamed(encoder, buffer=16, examples=[]).get(0)


def write_parquet(tmp_path, n=24):
    path = tmp_path / "train.parquet"
    rows = builtin_examples("train")[:n]
    pd.DataFrame({"q": [e.source for e in rows], "a": [e.target for e in rows]}).to_parquet(path)
    return path


def config_for(tmp_path, path, name, **overrides) -> TrainConfig:
    values = dict(data=str(path), source_field="q", target_field="a", dev_split="",
                  out=str(tmp_path / name), batch_size=4, lr=5e-3, max_steps=5, progress=False,
                  seed=3, **LIMITS)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def run(config, tokenizer, **kwargs):
    torch.manual_seed(0)  # the same frozen base for every run
    return Trainer(config, PrefixConfig(length=2, mlp_hidden=16), model=tiny_gpt2(TOKENIZER_VOCAB),
                   tokenizer=tokenizer, **kwargs)  # fmt: skip


def encoders_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))  # fmt: skip


def test_streamed_training_equals_in_memory_when_one_buffer_holds_the_data(tmp_path, bpe_tokenizer):
    path = write_parquet(tmp_path)
    run(config_for(tmp_path, path, "memory"), bpe_tokenizer).fit()
    summary = run(config_for(tmp_path, path, "stream", streaming=True), bpe_tokenizer).fit()
    assert encoders_equal(load_encoder(tmp_path / "memory" / "checkpoint"),
                          load_encoder(tmp_path / "stream" / "checkpoint"))  # fmt: skip
    assert summary["steps"] == 5


def test_streamed_resume_is_bit_exact_and_epochs_count_one_pass(
    tmp_path, bpe_tokenizer, monkeypatch
):
    path = write_parquet(tmp_path)
    small = dict(streaming=True, stream_buffer=8, checkpoint_every=2)
    run(config_for(tmp_path, path, "straight", **small), bpe_tokenizer).fit()
    crashing = run(config_for(tmp_path, path, "resumed", **small), bpe_tokenizer)
    original = crashing._train_step

    def crash_at_step_3(step):
        if step == 3:
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(crashing, "_train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    run(config_for(tmp_path, path, "resumed", resume=True, **small), bpe_tokenizer).fit()
    assert encoders_equal(load_encoder(tmp_path / "straight" / "checkpoint"),
                          load_encoder(tmp_path / "resumed" / "checkpoint"))  # fmt: skip
    epochs = config_for(tmp_path, path, "epochs", max_steps=0, epochs=2, **small)
    summary = run(epochs, bpe_tokenizer).fit()
    assert summary["steps"] == 2 * 3 * 2  # 24 rows: 3 buffers of 8, 2 batches each, 2 passes
    assert json.loads((tmp_path / "epochs" / "run.json").read_text())["train_examples"] == 24


def test_streaming_refuses_what_needs_the_data_in_memory(tmp_path, bpe_tokenizer):
    path = write_parquet(tmp_path)
    base = config_for(tmp_path, path, "x", streaming=True)
    for change, flag in [({"train_size": 4}, "--train-size"), ({"stream_buffer": 0}, "--stream-buffer"),
                         ({"max_batch_tokens": 64, "max_steps": 0}, "--max-steps"),
                         ({"data": f"a={path},b={path}"}, "single dataset")]:  # fmt: skip
        with pytest.raises(ConfigError, match=flag):
            train(dataclasses.replace(base, **change), PrefixConfig(length=2, mlp_hidden=16),
                  model=tiny_gpt2(TOKENIZER_VOCAB), tokenizer=bpe_tokenizer)  # fmt: skip


def test_streaming_refuses_an_example_past_the_model_positions_before_training_on_it(
    tmp_path, bpe_tokenizer, monkeypatch
):
    path = tmp_path / "train.parquet"
    rows = {"q": ["name : Zizzi"] * 24, "a": ["Zizzi."] * 24}
    rows["q"][17] = " ".join(["name : The Eagle | food : French"] * 20)  # 48 tokens, cut
    pd.DataFrame(rows).to_parquet(path)
    config = config_for(tmp_path, path, "long", streaming=True, stream_buffer=8)
    torch.manual_seed(0)
    trainer = Trainer(config, PrefixConfig(length=2, mlp_hidden=16), tokenizer=bpe_tokenizer,
                      model=tiny_gpt2(TOKENIZER_VOCAB, positions=40))  # fmt: skip
    steps = []
    original = trainer.method.loss
    monkeypatch.setattr(trainer, "loss", lambda batch: steps.append(1) or original(batch))
    with pytest.raises(ConfigError, match=r"streamed training example 18 in .*train\.parquet "
                                          r"\(the longest of its buffer; source 'name : The "
                                          r".*prefix of 2 positions \(P\).*past the model's 40 "
                                          r"positions; lower --max-source-tokens"):  # fmt: skip
        trainer.fit()
    assert len(steps) == 4  # the two buffers before it trained; its buffer did not
