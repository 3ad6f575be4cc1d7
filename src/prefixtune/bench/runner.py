"""Worker processes of `prefixtune bench`: run one configuration per process (forked from a
server that has only imported the libraries, or a fresh `python -m prefixtune.bench.runner --worker`),
and the exact-malloc memory pass."""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

RESULT_MARK = "BENCH_RESULT "
TIMED = ("train", "real", "generate", "multitenant", "quantize_train", "quantize_decode")
# prefixtune first: its package silences import-time noise before transformers imports torchao.
PRELOAD = ["prefixtune", "torch", "transformers", "peft", "prefixtune.bench.train",
           "prefixtune.bench.generate", "prefixtune.bench.flops", "prefixtune.training.trainer", "prefixtune.generation.engine",
           "prefixtune.interop.peft", "prefixtune.bench.scaling_worker"]  # fmt: skip


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process (the worker side)."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    kind = spec["kind"]
    if kind == "peak":
        from prefixtune.bench.flops import matmul_peak
        from prefixtune.core.models import dtype_named

        device = spec.get("device", "cpu")  # CUDA: timed with events (flops.event_rate)
        if spec.get("quick"):
            shapes, seconds, rounds = ((128, 128, 128), (256, 64, 256)), 0.1, 1
            return {n: matmul_peak(dtype_named(n), shapes, seconds, rounds, device)
                    for n in spec["dtypes"]}  # fmt: skip
        return {name: matmul_peak(dtype_named(name), device=device) for name in spec["dtypes"]}
    if kind in ("train", "real", "equal_loss"):
        from prefixtune.bench import train as bench_train

        runner = {"train": bench_train.run_train, "real": bench_train.run_real,
                  "equal_loss": bench_train.run_equal_loss}[kind]  # fmt: skip
        return runner(spec)
    if kind == "scaling":  # bench --suite scaling: one point of a curve
        from prefixtune.bench.scaling_worker import run_point

        return run_point(spec)
    if kind in ("attention", "cross_entropy"):
        from prefixtune.bench import kernels as bench_kernels

        runner = {"attention": bench_kernels.run_attention,
                  "cross_entropy": bench_kernels.run_cross_entropy}[kind]  # fmt: skip
        return runner(spec)
    if kind.startswith("quantize_"):  # bench --suite quantize: fp32 against the int8 base
        from prefixtune.bench.quantize import run_spec as run_quantize

        return run_quantize(spec)
    from prefixtune.bench import generate as bench_generate

    runner = {"generate": bench_generate.run_generate,
              "multitenant": bench_generate.run_multitenant}[kind]  # fmt: skip
    return runner(spec)


def _guarded(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    if threads:
        import torch

        torch.set_num_threads(threads)
    exact = None
    if spec.get("exact_malloc"):
        from prefixtune.bench.common import exact_malloc

        exact = exact_malloc()
    began = time.perf_counter()
    try:
        result = run_spec(spec)
    except Exception as err:  # reported in the JSON, never hides the others
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["worker_seconds"] = round(time.perf_counter() - began, 2)
    if exact is not None:
        result["exact_malloc"] = exact
    return result


def _child(conn, spec: dict[str, Any], threads: int) -> None:
    conn.send(_guarded(spec, threads))
    conn.close()


class Runner:
    """Runs each spec in a fresh worker process and returns its result dict."""

    def __init__(self, isolation: str, threads: int, timeout: float) -> None:
        self.isolation, self.threads, self.timeout = isolation, threads, timeout
        if isolation == "forkserver":
            import multiprocessing

            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(PRELOAD)

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.isolation == "subprocess":
            return self._subprocess(spec)
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_child, args=(send, spec, self.threads))
        process.start()
        send.close()
        result = None
        try:
            if receive.poll(self.timeout):
                result = receive.recv()
        except EOFError:
            result = None
        process.join(30 if result is not None else 1)
        if process.is_alive():
            process.kill()
            process.join()
        if result is None:
            why = "timed out" if process.exitcode in (None, -9) else f"exit code {process.exitcode}"
            result = {"error": f"worker {why} (killed for memory shows as exit code -9)"}
        return result

    def _subprocess(self, spec: dict[str, Any]) -> dict[str, Any]:
        import subprocess

        command = [sys.executable, "-m", "prefixtune.bench.runner", "--worker", json.dumps(spec)]
        if self.threads:
            command += ["--threads", str(self.threads)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"error": "worker timed out"}
        for line in reversed(done.stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK) :])
        return {"error": f"worker exit code {done.returncode}: {done.stderr[-2000:]}"}


def memory_pass(runner: Runner, spec: dict[str, Any]) -> dict[str, Any]:
    """The config once more, in a fresh worker with exact malloc: one warm-up + one step. Its
    peak follows live memory and repeats run to run (the timing run's RSS peak also holds
    whatever the allocator kept); comparisons use it."""
    again = runner({**spec, "iters": 1, "warmup": min(spec["warmup"], 1), "exact_malloc": True})
    if "peak_rss_mb" not in again:
        return {"memory_pass": {"error": again.get("error", "no memory figure")}}
    keys = ("rss_before_mb", "peak_rss_mb", "step_extra_mb", "exact_malloc")
    return {
        "memory_pass": {key: again.get(key) for key in keys},
        "live_peak_mb": again["peak_rss_mb"],
        "live_step_extra_mb": again["step_extra_mb"],
    }


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[argv.index("--worker") + 1])
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 0
    print(RESULT_MARK + json.dumps(_guarded(spec, threads), default=str), flush=True)
    return 0


if __name__ == "__main__":  # `python -m prefixtune.bench.runner --worker SPEC`: one isolated config
    sys.exit(worker_main(sys.argv))
