"""`prefixtune bench --suite fused`: the suite's plan (every model, the device in every spec on
CUDA), its quick form measured in-process, the markdown and where it is written."""

from __future__ import annotations

import argparse
import json

import pytest

from prefixtune.bench.fused import markdown, measure_pairs, specs, suite_plan
from prefixtune.bench.runner import run_spec
from prefixtune.cli import bench as bench_cli
from prefixtune.cli.bench_fused import fused_out

pytestmark = pytest.mark.usefixtures("one_thread")


def test_suite_plan_is_the_module_plan_per_model_and_names_the_device_on_cuda():
    configs, peak = suite_plan(["tiny-llama", "tiny-gpt2"], ["fp32"], quick=True, iters=1)
    assert configs == {**specs("tiny-llama", ["fp32"], True, 1),
                       **specs("tiny-gpt2", ["fp32"], True, 1)}  # fmt: skip
    assert peak == {"kind": "peak", "dtypes": ["fp32"], "quick": True}
    on_gpu, peak = suite_plan(["tiny-llama"], ["bf16"], quick=True, iters=1, device="cuda")
    assert all(spec["device"] == "cuda" for spec in on_gpu.values())
    assert peak["device"] == "cuda"


def test_fused_out_sits_beside_the_bench_json(tmp_path):
    assert fused_out(str(tmp_path / "gpu.json")) == tmp_path / "gpu-fused.json"
    assert fused_out(str(tmp_path / "gpu-fused.json")) == tmp_path / "gpu-fused.json"


def test_the_quick_suite_measures_every_pair_and_fusing_changes_no_token():
    configs, peak = suite_plan(["tiny-llama"], ["fp32"], quick=True, iters=1)
    report = measure_pairs(configs, run_spec, rounds=2, peak_spec=peak)
    rows = {row["key"]: row for row in report["comparisons"]}
    assert set(rows) == set(configs)
    for key, row in rows.items():
        assert "error" not in row, row
        assert row["speedup"] > 0
        if key.startswith("generate/"):
            assert row["same_tokens"] is True  # fp32: fused decoding is the same computation
        else:
            assert row["loss_diff"] <= 1e-4 and row["mfu_unfused"] > 0
    assert all(result["rounds"] == 2 for result in report["results"].values())
    text = markdown({"meta": {}, **report})
    assert all(f"| {key} |" in text for key in rows)


@pytest.mark.slow  # worker processes (a forkserver importing torch, transformers and PEFT)
def test_bench_suite_fused_writes_json_and_markdown(tmp_path):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--suite", "fused", "--quick", "--iters", "1", "--dtypes", "fp32",
                              "--out", str(out)])  # fmt: skip
    assert bench_cli.run(args) == 0
    report = json.loads((tmp_path / "bench-fused.json").read_text())
    assert report["meta"]["rounds"] == 2 and len(report["comparisons"]) == 2
    assert (tmp_path / "bench-fused.md").read_text().startswith("# Fused frozen projections")
    assert not out.exists()  # the fused suite alone writes no bench.json
