"""bench/fused.py: the plan of pairs, pooling rounds, and the fused/unfused ratios."""

from __future__ import annotations

import pytest

from prefixtune.bench.fused import _pooled, compare, specs


def test_specs_name_one_train_and_one_generate_config_per_dtype():
    found = specs("tiny-llama", ["fp32", "bf16"], quick=True, iters=2)
    assert sorted(found) == ["generate/tiny-llama/bf16/ours", "generate/tiny-llama/fp32/ours",
                             "train/tiny-llama/bf16/P2/ours-mlp",
                             "train/tiny-llama/fp32/P2/ours-mlp"]  # fmt: skip
    assert all("fuse" not in spec and spec["iters"] == 2 for spec in found.values())


def train_run(times):
    return {"times_s": times, "tokens_per_step": 100, "useful_flops": {"total": 4e9},
            "loss": 1.5, "peak_rss_mb": 10.0}  # fmt: skip


def test_pooled_rounds_and_ratios():
    plain = _pooled([train_run([1.0, 3.0]), train_run([2.0])])  # median 2 s
    fused = _pooled([train_run([1.0]), train_run([1.0, 2.0])])  # median 1 s
    assert plain["tokens_per_s"] == 50 and fused["tokens_per_s"] == 100
    row = compare("train/m/fp32/P2/ours-mlp", plain, fused, {"fp32": {"gflops": 8.0}})
    assert row["speedup"] == pytest.approx(2.0)
    assert row["mfu_unfused"] == pytest.approx(0.25) and row["mfu_fused"] == pytest.approx(0.5)
    assert row["loss_diff"] == 0.0


def test_generate_rows_compare_tokens_and_errors_pass_through():
    def gen(times, outputs):
        return {"times_s": times, "new_tokens_total": 10, "outputs": outputs}

    row = compare("generate/m/fp32/ours", _pooled([gen([1.0], [[1]])]),
                  _pooled([gen([0.5], [[2]])]), {})  # fmt: skip
    assert row["speedup"] == pytest.approx(2.0) and row["same_tokens"] is False
    broken = _pooled([{"error": "boom"}])
    assert compare("generate/m/fp32/ours", broken, broken, {})["error"] == "boom"
