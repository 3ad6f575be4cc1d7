"""`prefixtune bench --suite scaling`: the quick grid runs and writes JSON/plots, the fit recovers
a known exponent, a failing point ends its curve with the reason, the device abstraction."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch

from prefixtune.bench import device as bench_device
from prefixtune.bench.runner import run_spec
from prefixtune.bench.scaling import build_curves, run_curve, run_scaling, stop_reason
from prefixtune.bench.scaling_report import (
    fit_power,
    fits,
    headline,
    markdown,
    memory_limits,
    plot,
    summarise,
)
from prefixtune.bench.scaling_worker import build_llama, parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(xs, spec=None):
    base = {"arch": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                     "vocab_size": 96}, "warmup": 1}  # fmt: skip
    return [(x, {**base, **(spec or {}), "x": x}) for x in xs]


def _ok(peak=400.0, seconds=0.1):
    return {"median_s": seconds, "peak_rss_mb": peak}


def test_fit_recovers_a_known_exponent():
    xs = [2.0**i for i in range(1, 9)]
    exact = fit_power(xs, [3.0 * x**1.7 for x in xs])
    assert exact["exponent"] == pytest.approx(1.7, abs=1e-9)
    assert exact["coefficient"] == pytest.approx(3.0, rel=1e-9)
    assert exact["r2"] == pytest.approx(1.0)
    rng = random.Random(0)
    noisy = fit_power(xs, [0.5 * x**2.0 * math.exp(rng.gauss(0, 0.05)) for x in xs])
    assert noisy["exponent"] == pytest.approx(2.0, abs=0.08)
    assert fit_power([4.0], [1.0]) is None  # one point: no fit


def test_a_failing_point_ends_its_curve_with_the_reason():
    calls = []

    def runner(spec):
        calls.append(spec["x"])
        return _ok() if spec["x"] == 1 else {"oom": "RuntimeError: can't allocate memory"}

    curve = run_curve(_points([1, 2, 4]), runner, budget_mb=8192, point_budget_s=60, log=str)
    assert calls == [1, 2]  # the point after the failure never runs
    assert [p["x"] for p in curve["points"]] == [1]
    assert curve["stopped_at"] == 2
    assert curve["stopped"].startswith("out of memory (RuntimeError: can't allocate")


def test_a_point_predicted_over_the_memory_budget_is_refused_unrun():
    calls = []

    def runner(spec):  # peak doubles with x: the third point extrapolates to 1600 MB
        calls.append(spec["x"])
        return _ok(peak=200.0 * spec["x"])

    curve = run_curve(_points([2, 4, 8]), runner, budget_mb=1000, point_budget_s=60, log=str)
    assert calls == [2, 4]
    assert curve["stopped_at"] == 8
    assert curve["stopped"] == "over memory budget (predicted 1600 MB > 1000 MB)"


def test_memory_is_predicted_from_the_step_part_alone():
    """Weights and runtime stay; only the step's own memory is extrapolated (here x^1)."""

    def runner(spec):
        return {**_ok(peak=1000.0 + 100 * spec["x"]), "rss_before_mb": 1000.0,
                "step_extra_mb": 100.0 * spec["x"]}  # fmt: skip

    curve = run_curve(_points([1, 2, 40, 80]), runner, budget_mb=5500, point_budget_s=60,
                      log=str)  # fmt: skip
    assert [p["x"] for p in curve["points"]] == [1, 2, 40]  # 5000 MB at 40; 9000 predicted at 80
    assert curve["stopped"] == "over memory budget (predicted 9000 MB > 5500 MB)"


def test_a_point_predicted_over_the_time_budget_is_refused_and_long_steps_skip_warmup():
    seen = []

    def runner(spec):  # time grows as x^2: 1 s, 4 s, then 16 s predicted
        seen.append((spec["x"], spec["warmup"], spec["memory_limit_mb"]))
        return _ok(seconds=float(spec["x"]) ** 2)

    curve = run_curve(_points([1, 2, 4]), runner, budget_mb=9999, point_budget_s=10, log=str)
    assert seen == [(1, 1, 9999), (2, 1, 9999)]  # 1 s predicted for x=2: 4 x 1 < 10, warm-up
    assert curve["stopped"].startswith("over the time budget (predicted 16 s")


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ({"error": "worker exit code -9 (killed for memory shows as exit code -9)"},
         "out of memory (worker killed)"),
        ({"error": "worker timed out (killed for memory shows as exit code -9)"},
         "over the time budget (worker timed out)"),
        ({"error": "worker exit code 1 (killed for memory shows as exit code -9)"},
         "error (worker exit code 1"),
        ({"refused": "PREFIX_TUNING does not work with gradient checkpointing."}, "refused ("),
        (_ok(peak=9000), "over memory budget (measured peak 9000 MB)"),
        (_ok(peak=100), None),
    ],
)  # fmt: skip
def test_stop_reasons(result, reason):
    found = stop_reason(result, budget_mb=8192)
    assert found == reason if reason is None else found.startswith(reason)


def test_headline_is_the_longest_input_each_tool_trains_on():
    def curve(xs, stopped):
        return {"points": [{"x": x, "result": _ok()} for x in xs], "stopped": stopped,
                "stopped_at": None}  # fmt: skip

    curves = {"input_length/ours": curve([128, 256], "over the time budget"),
              "input_length/ours-ckpt": curve([128, 256, 512, 1024], "end of the grid"),
              "input_length/peft": curve([128], "over memory budget"),
              "batch/ours": curve([1, 2, 4, 8, 16, 32, 64], "end")}  # fmt: skip
    head = headline(curves, 8192)
    assert head["tools"]["prefixtune"]["longest"] == 1024
    assert head["tools"]["prefixtune"]["variant"] == "ours-ckpt"
    assert head["tools"]["PEFT"]["longest"] == 128
    assert head["ratio"] == 8 and head["met"]


def test_the_extrapolated_longest_input_solves_the_fitted_memory_for_the_budget():
    points = [{"x": x, "result": {"median_s": 0.01 * x, "peak_rss_mb": 1000 + 2 * x,
                                  "step_extra_mb": 2.0 * x, "rss_before_mb": 1000.0}}
              for x in (128, 256, 512)]  # fmt: skip
    curves = {"input_length/ours": {"points": points}, "batch/ours": {"points": points}}
    found = memory_limits(curves, fits(curves), budget_mb=5000)
    assert list(found) == ["input_length/ours"]
    assert found["input_length/ours"] == pytest.approx(2000.0)  # 1000 + 2 * T = 5000


def test_parameter_count_matches_the_built_model():
    arch = _points([1])[0][1]["arch"]
    model = build_llama(arch, seed=0, device="cpu")
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_one_quick_dimension_runs_and_writes_json_and_plots(tmp_path):
    curves = build_curves(True, "cpu", "fp32", iters=1, warmup=0, dimensions=("input_length",))
    results = run_scaling(curves, run_spec, budget_mb=8192, point_budget_s=60, log=str)
    assert [len(c["points"]) for c in results.values()] == [3, 3, 3, 0]  # PEFT refuses ckpt
    report = {"meta": {"device": "cpu"}, "curves": results, **summarise(results, 8192)}
    assert report["headline"]["tools"]["PEFT"]["longest"] == 64
    assert report["fits"]["input_length/ours"]["median_s"]["points"] == 3
    (png,) = plot(report, tmp_path / "scaling")
    assert png.name == "scaling-input_length.png" and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # ~1 min: every curve of the quick grid, PEFT loading adapters included
def test_the_quick_grid_runs_and_writes_json_and_plots(tmp_path):
    curves = build_curves(True, "cpu", "fp32", iters=1, warmup=0)
    assert {name.split("/")[0] for name in curves} == {
        "input_length", "prefix_length", "batch", "tenants", "model_size"}  # fmt: skip
    results = run_scaling(curves, run_spec, budget_mb=8192, point_budget_s=60, log=str)
    assert results["input_length/peft-ckpt"]["stopped"].startswith("refused (")
    for name, curve in results.items():
        if name != "input_length/peft-ckpt":
            assert curve["stopped"] == "end of the grid", (name, curve.get("failed"))
            assert all(p["result"]["median_s"] > 0 for p in curve["points"])
    report = {"meta": {"device": "cpu"}, "curves": results, **summarise(results, 8192)}
    out = tmp_path / "scaling.json"
    out.write_text(json.dumps(report, default=str))
    pngs = plot(report, out.with_suffix(""))
    assert [p.name for p in pngs] == [f"scaling-{d}.png" for d in
                                      ("input_length", "prefix_length", "batch", "tenants",
                                       "model_size")]  # fmt: skip
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert report["fits"]["batch/ours"]["median_s"]["points"] == 2
    text = markdown(report)
    assert "| input_length/peft-ckpt |" in text and "Longest input" in text


@pytest.mark.slow  # starts a forkserver that imports torch, transformers and PEFT
def test_a_real_out_of_memory_in_a_worker_ends_the_curve():
    """The worker holds itself to the budget (RLIMIT_DATA): a point over it fails inside the
    worker, which reports it, and the curve ends there."""
    from prefixtune.bench.runner import Runner

    points = build_curves(True, "cpu", "fp32", iters=1, warmup=0, dimensions=("batch",))
    spec = {**points["batch/ours"][0][1], "batch": 4096, "seq": 4096}  # ~6 GB of activations
    curve = run_curve([(1, spec)], Runner("forkserver", 1, 120), budget_mb=2048,
                      point_budget_s=60, log=str)  # fmt: skip
    assert curve["points"] == []
    assert curve["stopped"].startswith("out of memory"), curve.get("failed")


# ------------------------------------------------------------------------------ device


class FakeEvent:
    def __init__(self, log, enable_timing):
        self.log, self.enable_timing = log, enable_timing

    def record(self):
        self.log.append("record")

    def elapsed_time(self, end):
        return 1500.0  # ms


class FakeCuda:
    def __init__(self, available=True):
        self.log, self.available = [], available

    def is_available(self):
        return self.available

    def Event(self, enable_timing):  # noqa: N802 - torch.cuda's name
        return FakeEvent(self.log, enable_timing)

    def synchronize(self):
        self.log.append("sync")

    def empty_cache(self):
        self.log.append("empty")

    def reset_peak_memory_stats(self):
        self.log.append("reset")

    def memory_allocated(self):
        return 100 * 2**20

    def max_memory_allocated(self):
        return 612 * 2**20


def test_cuda_meter_times_with_events_between_synchronizes_and_reads_the_allocator_peak():
    cuda = FakeCuda()
    meter = bench_device.CudaMeter(cuda)
    result = bench_device.timed_steps(meter, lambda: cuda.log.append("step"), iters=2, warmup=1)
    assert result["times_s"] == [1.5, 1.5]
    assert cuda.log[:4] == ["sync", "empty", "reset", "step"]  # warm-up after the reset
    assert cuda.log[4:9] == ["sync", "record", "step", "record", "sync"]
    assert result["peak_rss_mb"] == 612 and result["step_extra_mb"] == 512


def test_cpu_meter_sees_a_step_allocation_and_the_cap_stops_timing_early():
    meter = bench_device.CpuMeter()
    big = 256 * 2**20 // 4

    def step():
        block = torch.ones(big)  # 256 MB, touched
        assert float(block[-1]) == 1.0

    result = bench_device.timed_steps(meter, step, iters=50, warmup=0, cap_s=0.0)
    assert len(result["times_s"]) == 1  # the cap stops after the first timed step
    assert result["step_extra_mb"] > 200


def test_device_cuda_without_cuda_fails_with_one_clear_error():
    with pytest.raises(bench_device.DeviceError, match="--device cuda: no CUDA device"):
        bench_device.check_device("cuda", FakeCuda(available=False))
    assert bench_device.check_device("cuda", FakeCuda()) == "cuda"
    assert bench_device.check_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_bench_device_cuda_on_this_machine_is_one_config_error(tmp_path):
    from prefixtune.cli import bench
    from prefixtune.config import ConfigError

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for suite in ("scaling", "train"):
        args = parser.parse_args(["--suite", suite, "--device", "cuda", "--quick",
                                  "--out", str(tmp_path / "b.json")])  # fmt: skip
        with pytest.raises(ConfigError, match="--device cuda"):
            bench.run(args)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("device", "expected"), [("cpu", True), ("cuda", False)])
def test_exact_malloc_reaches_every_cpu_point(device, expected):
    """The worker applies exact malloc (bench.runner._guarded) when its spec asks: on the CPU the
    budget then holds live tensors; CUDA's allocator is measured as it is."""
    curves = build_curves(True, device, "fp32", iters=1, warmup=0, exact_malloc=True)
    specs = [spec for points in curves.values() for _, spec in points]
    assert specs and all(spec["exact_malloc"] is expected for spec in specs)
    plain = build_curves(True, device, "fp32", iters=1, warmup=0)
    assert not any(spec["exact_malloc"] for points in plain.values() for _, spec in points)


def test_a_flat_memory_curve_is_not_extrapolated_to_absurd_lengths():
    """Step memory that barely grows would 'reach' the budget at astronomic lengths: past 100x the
    longest input measured the report says it cannot tell instead of printing a number."""
    points = [{"x": x, "result": {"median_s": 0.01 * x, "peak_rss_mb": 1000.0 + x ** 0.05,
                                  "step_extra_mb": x ** 0.05, "rss_before_mb": 1000.0}}
              for x in (16, 32, 64)]  # fmt: skip
    curves = {"input_length/peft": {"points": points, "stopped": "end of the grid",
                                    "stopped_at": None}}  # fmt: skip
    found = memory_limits(curves, fits(curves), budget_mb=8192)
    assert found == {"input_length/peft": None}
    flatter = [{**p, "result": {**p["result"], "step_extra_mb": p["x"] ** 1e-3}} for p in points]
    curves_flatter = {"input_length/peft": {**curves["input_length/peft"], "points": flatter}}
    assert memory_limits(curves_flatter, fits(curves_flatter), 8192) == {"input_length/peft": None}
    report = {"meta": {"device": "cpu"}, "curves": curves, **summarise(curves, 8192)}
    assert "beyond 100x the longest input measured" in markdown(report)
