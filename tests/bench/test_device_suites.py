"""`prefixtune bench --device cuda` for the train and generate suites (and the suites built on
their workers): the plan names the device, the workers put the model and batch there and time
through bench/device.py's meter, the GPU's matmul peak is timed with CUDA events; on a machine
without CUDA every suite stops with one clear error. A stand-in torch.cuda plays the GPU."""

from __future__ import annotations

import argparse

import pytest
import torch

from prefixtune.bench import device as bench_device
from prefixtune.bench import flops as bench_flops
from prefixtune.bench import generate as bench_generate
from prefixtune.bench import train as bench_train
from prefixtune.bench.plan import CUDA_SUITES, SUITES, build_plan, cuda_suites, resolve_dtypes
from prefixtune.cli import bench as bench_cli
from prefixtune.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    """A stand-in torch.cuda whose events read a step counter: each timed call advances it."""

    def __init__(self, ms_per_call: float = 300.0, fixed_ms: float | None = None) -> None:
        self.calls, self.ms, self.fixed, self.log = 0, ms_per_call, fixed_ms, []

    def tick(self) -> None:
        self.calls += 1
        self.log.append("call")

    def Event(self, enable_timing):  # noqa: N802 - torch.cuda's name
        clock = self

        class Event:
            def record(self):
                self.at = clock.calls
                clock.log.append("record")

            def elapsed_time(self, end):
                return clock.fixed if clock.fixed is not None else (end.at - self.at) * clock.ms

        assert enable_timing
        return Event()

    def synchronize(self):
        self.log.append("sync")

    def empty_cache(self):
        self.log.append("empty")

    def reset_peak_memory_stats(self):
        self.log.append("reset")

    def memory_allocated(self):
        return 50 * 2**20

    def max_memory_allocated(self):
        return 250 * 2**20


def test_cuda_plan_names_the_device_in_every_spec_and_the_cpu_plan_stays_as_it_was():
    cpu = build_plan(["all"], None, ["fp32"], quick=True, iters=2, warmup=1)
    assert not any("device" in spec for _name, spec in cpu)
    suites, left_out = cuda_suites(["all"])
    assert suites == list(CUDA_SUITES) and set(left_out) == set(SUITES) - set(CUDA_SUITES)
    cuda = build_plan(suites, None, ["bf16"], quick=True, iters=2, warmup=1, device="cuda")
    assert cuda and all(spec["device"] == "cuda" for _name, spec in cuda)
    kinds = {spec["kind"] for _name, spec in cuda}
    assert kinds == {"train", "generate", "multitenant", "equal_loss", "peak"}
    without = [(n, {k: v for k, v in s.items() if k != "device"}) for n, s in cuda]
    assert without == build_plan(suites, None, ["bf16"], quick=True, iters=2, warmup=1)
    assert resolve_dtypes(["auto"], "cuda") == (["bf16"], None)


def test_a_suite_that_measures_on_the_cpu_only_is_named_in_the_error():
    with pytest.raises(ValueError, match="--suite real kernels measures on the CPU only"):
        cuda_suites(["train", "real", "kernels"])
    assert cuda_suites(["train", "generate"]) == (["train", "generate"], [])


def test_measure_on_cuda_times_events_and_warms_with_warm():
    clock = Clock()
    warmed = []
    result = bench_device.measure("cuda", clock.tick, iters=3, warmup=2,
                                  warm=lambda: warmed.append(1), cuda=clock)  # fmt: skip
    assert warmed == [1, 1] and clock.calls == 3  # the warm-ups ran `warm`, not `step`
    assert result["times_s"] == [0.3, 0.3, 0.3] and result["median_s"] == pytest.approx(0.3)
    assert result["peak_rss_mb"] == 250 and result["step_extra_mb"] == 200
    assert result["memory_kind"].startswith("CUDA")
    cpu = bench_device.measure("cpu", lambda: None, iters=2, warmup=0)
    assert len(cpu["times_s"]) == 2 and "memory_kind" not in cpu  # common.measure, unchanged


def test_event_rate_doubles_the_calls_until_a_batch_lasts_long_enough():
    clock = Clock(ms_per_call=300.0)
    rate = bench_flops.event_rate(clock.tick, 3 * 10**9, seconds=1.0, cuda=clock)
    # 1 untimed call, then batches of 1 (0.3 s), 2 (0.6 s), 4 (1.2 s): 4 x 3 GFLOP in 1.2 s
    assert clock.calls == 1 + 1 + 2 + 4
    assert rate == pytest.approx(10.0)
    assert clock.log[1:4] == ["sync", "record", "call"]  # synchronized before the clock starts


def test_the_cuda_peak_adds_the_large_shapes(monkeypatch):
    seen = []

    def fake_rate(dtype, m, k, n, seconds):
        seen.append((m, k, n))
        return float(m)

    monkeypatch.setattr(bench_flops, "_cuda_matmul_rate", fake_rate)
    peak = bench_flops.matmul_peak(torch.bfloat16, rounds=1, device="cuda")
    assert seen == list(bench_flops.CUDA_PEAK_SHAPES) and peak["gflops"] == 8192.0


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """Workers asked for "cuda" run here on the CPU, but through the CUDA code path: the meter
    reads a stand-in torch.cuda; what they asked build_model and on_device for is recorded."""
    clock, asked = Clock(fixed_ms=100.0), {"model": [], "batch": []}  # every step: 0.1 s
    real_meter = bench_device.CudaMeter
    monkeypatch.setattr(bench_device, "CudaMeter", lambda cuda=None: real_meter(clock))
    real_on_device = bench_device.on_device

    def on_device(batch, device):
        asked["batch"].append(device)
        return real_on_device(batch, "cpu")

    monkeypatch.setattr(bench_device, "on_device", on_device)
    for module in (bench_train, bench_generate):
        real_build = module.build_model

        def build(name, *, seed=0, tokenizer=False, device="cpu", real_build=real_build):
            asked["model"].append(device)
            return real_build(name, seed=seed, tokenizer=tokenizer)

        monkeypatch.setattr(module, "build_model", build)
    return clock, asked


def _spec(kind, impl, **extra):
    base = {"kind": kind, "impl": impl, "model": "tiny-llama", "dtype": "fp32", "iters": 2,
            "warmup": 1, "seed": 0, "mlp_hidden": 16, "device": "cuda"}  # fmt: skip
    return {**base, **extra}


@pytest.mark.parametrize("impl", ["ours", "peft", "frozen"])
def test_train_worker_puts_model_and_batch_on_the_device_and_times_with_the_meter(
    stand_in_gpu, impl
):
    clock, asked = stand_in_gpu
    spec = _spec("train", impl, batch=2, seq=8, prefix_len=3, reparam=True)
    result = bench_train.run_train(spec)
    assert asked == {"model": ["cuda"], "batch": ["cuda"]}
    assert clock.log.count("reset") == 1 and clock.log.count("record") == 4  # 2 timed steps
    assert result["peak_rss_mb"] == 250 and result["memory_kind"].startswith("CUDA")
    assert result["times_s"] == [0.1, 0.1] and result["tokens_per_s"] == pytest.approx(160)
    assert result["tokens_per_step"] == 16 and result["useful_flops"]["total"] > 0
    assert result["loss"] > 0


@pytest.mark.parametrize(("run", "impl"), [(bench_generate.run_generate, "ours"),
                                           (bench_generate.run_generate, "peft"),
                                           (bench_generate.run_multitenant, "ours")])  # fmt: skip
def test_decoding_workers_build_on_the_device_and_time_with_the_meter(stand_in_gpu, run, impl):
    clock, asked = stand_in_gpu
    spec = _spec("generate", impl, prompts=2, new_tokens=3, prefix_len=2, prompt_min=2,
                 prompt_max=4)  # fmt: skip
    result = run(spec)
    assert asked["model"] == ["cuda"] and clock.log.count("record") == 4
    assert result["new_tokens_total"] == 6 and [len(r) for r in result["outputs"]] == [3, 3]
    assert result["memory_kind"].startswith("CUDA")


def test_equal_loss_check_runs_on_the_device(stand_in_gpu):
    _clock, asked = stand_in_gpu
    spec = {"kind": "equal_loss", "model": "tiny-llama", "prefix_len": 2, "reparam": True,
            "mlp_hidden": 16, "batch": 2, "seq": 8, "seed": 0, "device": "cuda"}  # fmt: skip
    result = bench_train.run_equal_loss(spec)
    assert asked == {"model": ["cuda"], "batch": ["cuda"]} and result["abs_diff"] <= 1e-4


def _args(tmp_path, *flags):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args([*flags, "--quick", "--out", str(tmp_path / "b.json")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("suite", [*SUITES, "scaling", "fused", "quantize", "all"])
def test_device_cuda_without_cuda_is_one_clear_error_for_every_suite(tmp_path, suite):
    with pytest.raises(ConfigError, match="--device cuda: no CUDA device"):
        bench_cli.run(_args(tmp_path, "--suite", suite, "--device", "cuda"))
    assert not list(tmp_path.iterdir())


def test_naming_a_cpu_only_suite_with_device_cuda_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_device, "check_device", lambda name, cuda=None: name)
    with pytest.raises(ConfigError, match="--suite real measures on the CPU only"):
        bench_cli.run(_args(tmp_path, "--suite", "train", "real", "--device", "cuda"))
    assert not list(tmp_path.iterdir())
