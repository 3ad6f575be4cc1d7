"""`prefixtune bench --suite scaling`: run the curves (one worker process per point), then write
the JSON, a markdown summary and one log-log PNG per dimension beside --out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefixtune.core.atomic_files import atomic_write_text


def scaling_out(out: str) -> Path:
    """The scaling JSON's path: --out itself when the scaling suite runs alone, else beside it."""
    path = Path(out)
    return path if "scaling" in path.stem else path.with_name(f"{path.stem}-scaling.json")


def run_scaling_suite(args: argparse.Namespace) -> int:
    """Measure, write JSON + markdown + plots; 0, or 1 when a point failed with an error."""
    from prefixtune.bench import device as bench_device
    from prefixtune.bench.common import environment
    from prefixtune.bench.runner import Runner
    from prefixtune.bench.scaling import build_curves, run_scaling
    from prefixtune.bench.scaling_report import markdown, plot, summarise
    from prefixtune.config import ConfigError

    try:
        device = bench_device.check_device(args.device)
    except bench_device.DeviceError as err:
        raise ConfigError(str(err)) from err
    if args.memory_budget_gb < 0 or args.point_budget_s <= 0:
        raise ConfigError("--memory-budget-gb must be >= 0 and --point-budget-s > 0")
    budget_gb = args.memory_budget_gb or bench_device.default_budget_gb(device)
    requested = [d for d in args.dtypes if d != "auto"]
    dtype = requested[0] if requested else bench_device.default_dtype(device)
    threads = args.threads or 1  # one thread unless asked: the machine is shared
    iters, warmup = args.iters, args.warmup
    exact = args.exact_malloc and device == "cpu"  # CUDA's allocator is measured as it is
    curves = build_curves(args.quick, device, dtype, iters, warmup, tuple(args.dimensions), exact)
    runner = Runner(args.isolation, threads, 3 * args.point_budget_s + 300)
    meta: dict[str, Any] = {
        **environment(), "device": device, "dtype": dtype, "threads": threads,
        "memory_budget_gb": budget_gb, "point_budget_s": args.point_budget_s,
        "quick": args.quick, "iters": iters, "warmup": warmup,
        "exact_malloc": exact,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    if device == "cuda":
        import torch

        meta["gpu"] = torch.cuda.get_device_name(0)
    out = scaling_out(args.out)

    def write(results: dict[str, Any]) -> dict[str, Any]:
        report = {"meta": meta, "curves": results, **summarise(results, budget_gb * 1024)}
        atomic_write_text(out, json.dumps(report, indent=1, default=str) + "\n")
        return report

    results = run_scaling(curves, runner, budget_gb * 1024, args.point_budget_s,
                          log=lambda line: print(line, flush=True), done=write)  # fmt: skip
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report = write(results)
    text = markdown(report)
    atomic_write_text(out.with_suffix(".md"), text)
    pngs = plot(report, out.with_suffix(""))
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md')} and {', '.join(str(p) for p in pngs)}")
    return 1 if any(c["stopped"].startswith("error") for c in results.values()) else 0
