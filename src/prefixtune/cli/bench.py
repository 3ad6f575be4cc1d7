"""`prefixtune bench`: measure prefixtune against PEFT's PrefixTuningConfig on one machine, in one
run (same model, data, batch and dtype), and write JSON plus a markdown summary.

Suites: train (tokens/s of forward + backward + AdamW step; prefix length 10 and 200, MLP
reparameterisation on and off, vs full fine-tuning and the frozen forward+backward floor),
generate (batched greedy decoding), multitenant (8 requests with 8 prefixes: one mixed batch vs
PEFT switching adapters), long (4 x 1024 tokens, prefix 200, gradient checkpointing on/off), mfu
(useful FLOPs over this CPU's measured matmul peak), real (E2E training batches), kernels (the
attention dtype and cross-entropy choices of the training step, against PyTorch's own). Every
configuration runs in its own worker process (forked from a server that has only imported the
libraries), timed as the median of --iters iterations after --warmup, with its peak resident
memory; by default a second, untimed worker per config measures the peak again with exact
malloc (reproducible). Timings are never asserted anywhere; see docs/PERFORMANCE.md.
Beside the plan: scaling (cli/bench_scaling.py) and fused (fused vs unfused frozen projections,
cli/bench_fused.py), each written beside --out. `--device cuda` (bench/device.py) measures
scaling, fused, train, generate, multitenant, long and mfu on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefixtune.bench.plan import BENCH_MODELS, OPT_IN_SUITES, SUITES, build_plan, resolve_dtypes
from prefixtune.bench.report import COMPILED, RATE_KEYS, pool_rounds
from prefixtune.bench.runner import TIMED, Runner, memory_pass
from prefixtune.bench.scaling import SCALING_SUITES
from prefixtune.core.atomic_files import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        nargs="+",
        choices=(*SUITES, *SCALING_SUITES, "fused", *OPT_IN_SUITES, "all"),
        default=["all"],
        help="what to measure (default: all; only when named: quantize, int8 base vs fp32; "
        "scaling; fused, fused frozen projections vs unfused, written beside --out)",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        choices=BENCH_MODELS,
        default=None,
        help="models (default: gpt2-small-random and smollm2 for train/mfu, "
        "smollm2 elsewhere; tiny-llama with --quick)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("auto", "fp32", "bf16"),
        default=["auto"],
        help="autocast dtypes; auto = fp32, plus bf16 where the CPU has native "
        "bf16 (it is emulated, 6-30x slower, on AVX2-only CPUs); bf16 with --device cuda",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and a tiny model: a smoke run for CI, not a measurement",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=5,
        help="timed iterations per config (>= 5 for reported numbers)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default; 1 with --quick)"
    )
    parser.add_argument(
        "--isolation",
        choices=("forkserver", "subprocess"),
        default="forkserver",
        help="worker processes forked from a pre-imported server, or a fresh "
        "`python -m prefixtune.bench.runner --worker` each (slower start)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also run prefixtune's training and decoding configs (train, mfu, real, generate, "
        f"multitenant) under torch.compile (`train --compile`, `generate --compile`), named "
        f"*{COMPILED}; each compiles for minutes first",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per config")
    parser.add_argument(
        "--memory-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each config's peak memory again in its own worker with exact malloc "
        "(reproducible; the timing run keeps the normal allocator)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        help="run only configs whose name contains one of these strings",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan this many times, config after config, and pool each config's "
        "timed iterations: a machine whose speed drifts then slows every config alike",
    )
    parser.add_argument(
        "--from-json",
        default="",
        help="measure nothing: recompute the targets, comparisons and markdown from the "
        "results in this bench JSON (e.g. after the report logic changed), written to --out",
    )
    parser.add_argument("--out", default="bench.json", help="JSON output; a .md summary beside it")  # fmt: skip
    _add_scaling_arguments(parser)


def _add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixtune.bench.scaling import DIMENSIONS

    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to measure: cpu, or cuda (CUDA-event timing, max_memory_allocated, SDPA "
        "flash/efficient kernels, bf16 for --dtypes auto, MFU against the GPU's measured "
        "matmul peak): suites scaling, fused, train, generate, multitenant, long, mfu",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=0.0,
        help="scaling: refuse points predicted over this peak memory and hold each worker to "
        "it (0: half this machine's available memory, at most 8 GB; CUDA: 90%% of free)",
    )
    parser.add_argument(
        "--point-budget-s",
        type=float,
        default=300.0,
        help="scaling: refuse points whose step is predicted over this many seconds, and stop "
        "timing a point once its steps took this long",
    )
    parser.add_argument(
        "--dimensions",
        nargs="+",
        choices=DIMENSIONS,
        default=list(DIMENSIONS),
        help="scaling: which dimensions to grow (default: all)",
    )
    parser.add_argument(
        "--exact-malloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scaling on the CPU: run each point with glibc returning freed blocks to the OS at "
        "once, so the measured peak and the --memory-budget-gb limit follow live tensors, not "
        "what the default allocator keeps (steps run a little slower, for every tool alike)",
    )


def _line(name: str, result: dict[str, Any]) -> str:
    if "error" in result or "refused" in result:
        return f"{name}: {result.get('error') or 'refused: ' + result['refused']}"[:300]
    parts = [name]
    if "median_s" in result:
        parts.append(f"{result['median_s']:.3f}s [{result['min_s']:.3f}-{result['max_s']:.3f}]")
    for key in RATE_KEYS:
        if key in result:
            parts.append(f"{result[key]:.0f} {key.replace('_per_s', '')}/s")
    if "peak_rss_mb" in result:
        parts.append(f"peak {result['peak_rss_mb']:.0f} MB (+{result['step_extra_mb']:.0f})")
    if "live_peak_mb" in result:
        parts.append(
            f"live peak {result['live_peak_mb']:.0f} MB (+{result['live_step_extra_mb']:.0f})"
        )
    if name == "mfu/peak":
        parts += [
            f"{d} {v['gflops']:.1f} GFLOP/s"
            for d, v in result.items()
            if isinstance(v, dict) and "gflops" in v
        ]
    if "abs_diff" in result:
        parts.append(f"|loss diff| {result['abs_diff']:.2e}")
    return "  ".join(parts)


def _write_report(meta: dict[str, Any], results: dict[str, Any], out: Path) -> None:
    from prefixtune.bench.report import markdown, summarise_results

    report = {"meta": meta, "results": results, **summarise_results(results, meta)}
    atomic_write_text(out, json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def run(args: argparse.Namespace) -> int:
    from prefixtune.bench.common import environment
    from prefixtune.config import ConfigError

    if args.from_json:
        try:
            earlier = json.loads(Path(args.from_json).read_text())
            meta, results = earlier["meta"], earlier["results"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"--from-json {args.from_json}: not a bench JSON ({err})") from err
        _write_report({**meta, "rerendered_from": args.from_json}, results, Path(args.out))
        return 0
    if args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        raise ConfigError("--iters and --rounds must be >= 1 and --warmup >= 0")
    device, left_out = _device_and_suites(args)  # one clear error before anything runs
    failed = 0
    if "scaling" in args.suite:
        from prefixtune.cli.bench_scaling import run_scaling_suite

        failed = run_scaling_suite(args)
    dtypes, note = resolve_dtypes(args.dtypes, device)
    if "fused" in args.suite:
        from prefixtune.cli.bench_fused import run_fused_suite

        failed = max(failed, run_fused_suite(args, device, dtypes))
    args.suite = [s for s in args.suite if s not in ("scaling", "fused")]
    if not args.suite:
        return failed
    plan = build_plan(args.suite, args.model, dtypes, args.quick, args.iters, args.warmup,
                      args.compile, device)  # fmt: skip
    if args.only:
        plan = [(name, spec) for name, spec in plan if any(part in name for part in args.only)]
    threads = args.threads or (1 if args.quick else 0)  # tiny ops: thread spin costs dominate
    runner = Runner(args.isolation, threads, args.timeout)
    if threads:
        import torch

        torch.set_num_threads(threads)
    meta = {**environment(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "quick": args.quick, "iters": args.iters, "warmup": args.warmup,
            "isolation": args.isolation, "dtypes": dtypes, "dtype_note": note,
            "memory_pass": args.memory_pass, "rounds": args.rounds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    if device == "cuda":  # the CPU's meta stays as it always was
        import torch

        meta.update(device=device, gpu=torch.cuda.get_device_name(0), memory_pass=False,
                    suites_left_out=left_out)  # fmt: skip
    results: dict[str, Any] = {}
    for round_no in range(1, args.rounds + 1):
        for i, (name, spec) in enumerate(plan, start=1):
            result = runner(spec)
            if meta["memory_pass"] and "median_s" in result and spec["kind"] in TIMED:
                result.update(memory_pass(runner, spec))
            if name in results:
                result = pool_rounds(results[name], result)
            results[name] = {"spec": spec, **result}
            label = f"[{i}/{len(plan)}]" + (f" round {round_no}" if args.rounds > 1 else "")
            print(f"{label} {_line(name, result)}", flush=True)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_report(meta, results, Path(args.out))
    errors = [n for n, r in results.items() if "error" in r]
    return 1 if errors or failed else 0


def _device_and_suites(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The checked --device; on CUDA the plan's suites ("all": those that measure there) and the
    ones left out. One ConfigError for a device this machine lacks or a suite it cannot run."""
    from prefixtune.bench import device as bench_device
    from prefixtune.bench.plan import cuda_suites
    from prefixtune.config import ConfigError

    try:
        device = bench_device.check_device(args.device)
    except bench_device.DeviceError as err:
        raise ConfigError(str(err)) from err
    if device == "cpu":
        return device, []
    side = [s for s in args.suite if s in ("scaling", "fused")]
    try:
        suites, left_out = cuda_suites([s for s in args.suite if s not in side])
    except ValueError as err:
        raise ConfigError(str(err)) from err
    args.suite = side + suites
    if left_out:
        print(f"--device cuda: --suite all leaves out {', '.join(left_out)} (CPU only so far)")
    return device, left_out
