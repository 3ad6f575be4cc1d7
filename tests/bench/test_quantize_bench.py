"""`bench --suite quantize`: its plan, and its workers run in-process on the tiny Llama."""

from __future__ import annotations

import pytest

from prefixtune.bench.plan import build_plan
from prefixtune.bench.runner import run_spec

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_pairs_fp32_with_int8_and_adds_e2e_at_full_size():
    quick = dict(build_plan(["quantize"], None, ["fp32"], True, 1, 0))
    assert sorted(quick) == sorted(
        f"quantize/tiny-llama/{mode}/{what}"
        for mode in ("fp32", "int8")
        for what in ("train", "decode-1-row", "decode-4-rows")
    )
    full = dict(build_plan(["quantize"], ["smollm2"], ["fp32"], False, 3, 1))
    assert full["quantize/e2e/int8"]["quantize"] == "int8"
    assert full["quantize/e2e/fp32"]["quantize"] == "none"
    assert full["quantize/smollm2/int8/decode-8-rows"]["rows"] == 8


def test_workers_measure_both_bases():
    plan = dict(build_plan(["quantize"], None, ["fp32"], True, 1, 0))
    got = {name: run_spec(spec) for name, spec in plan.items() if "decode-4" in name or
           name.endswith("/train")}  # fmt: skip
    fp32, int8 = (got[f"quantize/tiny-llama/{m}/train"] for m in ("fp32", "int8"))
    assert int8["weight_mb"] < fp32["weight_mb"] and int8["tokens_per_s"] > 0
    assert abs(int8["loss"] - fp32["loss"]) < 0.05 * fp32["loss"]  # same batch, same prefix
    decoded = got["quantize/tiny-llama/int8/decode-4-rows"]
    assert decoded["new_tokens_per_s"] > 0 and len(decoded["first_row"]) == 8
