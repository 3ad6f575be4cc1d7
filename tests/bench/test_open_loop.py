"""The open-loop benchmark: the one-prefix-at-a-time baseline scheduler never mixes prefixes (and
gives the mixed scheduler's tokens), and a tiny run over the live HTTP server reports every
(prefix count, mode, rate) with consistent numbers, a JSON file and a plot."""

from __future__ import annotations

import json

import pytest

from prefixtune.bench.open_loop import OnePrefixScheduler, open_loop
from prefixtune.bench.serve import _tenant_bank
from prefixtune.config import GenerateConfig
from prefixtune.data.encoding import prompt_ids
from prefixtune.serving.scheduler import Scheduler

from conftest import TOKENIZER_VOCAB, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer):
    tokenizer = bpe_tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tiny_gpt2(TOKENIZER_VOCAB).eval(), tokenizer


@pytest.mark.parametrize("cls, batches", [(Scheduler, 1), (OnePrefixScheduler, 2)])
def test_the_baseline_serves_one_prefix_per_batch(tiny, tmp_path, cls, batches):
    model, tok = tiny
    bank = _tenant_bank(model, tok, 2, 3, tmp_path)
    scheduler = cls(model, bank, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    max_batch_size=4, max_wait_ms=0)  # fmt: skip
    config = GenerateConfig(max_new_tokens=5)
    jobs = [(prompt_ids(f"input {i}", tok), f"t{i % 2}") for i in range(4)]
    futures = [scheduler.submit(p, t, config) for p, t in jobs]  # all queued before the start
    scheduler.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        scheduler.close(10)
    assert scheduler.counters["batches"] == batches
    assert [r.batch_rows for r in results] == ([4] * 4 if batches == 1 else [2] * 4)
    reference = Scheduler(model, bank, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, max_batch_size=1).start()  # fmt: skip
    try:
        alone = [reference.submit(p, t, config).result(timeout=60).tokens for p, t in jobs]
    finally:
        reference.close(10)
    assert [r.tokens for r in results] == alone


def test_a_tiny_open_loop_run_reports_every_rate_and_mode(tiny, tmp_path):
    model, tok = tiny
    out, plot = tmp_path / "open.json", tmp_path / "open.png"
    report = open_loop(model=model, tokenizer=tok, prefix_counts=(2,), rates=(50.0, 200.0),
                       requests=4, max_new_tokens=3, max_batch_size=4, prefix_length=2,
                       out_json=str(out), plot=str(plot))  # fmt: skip
    rows = report["rows"]
    assert [(r["mode"], r["offered_rate"]) for r in rows] == [
        ("mixed", 50.0),
        ("mixed", 200.0),
        ("per_prefix", 50.0),
        ("per_prefix", 200.0),
    ]
    for row in rows:
        assert row["requests"] == 4 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["ttft_p50_ms"] <= row["p95_ms"]
    assert json.loads(out.read_text())["rows"] == rows
    assert plot.stat().st_size > 1000
