"""`prefixtune bench --suite fused`: the fused frozen projections (core/fuse.py) side by side
with the unfused model (bench/fused.py), written as JSON + markdown beside --out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prefixtune.core.atomic_files import atomic_write_text


def fused_out(out: str) -> Path:
    """The fused JSON's path: --out itself when its name says fused, else beside it."""
    path = Path(out)
    return path if "fused" in path.stem else path.with_name(f"{path.stem}-fused.json")


def run_fused_suite(args: argparse.Namespace, device: str, dtypes: list[str]) -> int:
    """Measure every model's pairs (alternating --rounds, at least 2 so each variant runs
    first once), write JSON + markdown; 0, or 1 when a config failed."""
    from prefixtune.bench.common import environment
    from prefixtune.bench.fused import markdown, measure_pairs, suite_plan
    from prefixtune.bench.runner import Runner

    models = args.model or (["tiny-llama"] if args.quick else ["smollm2"])
    threads = args.threads or 1  # the module's default: one thread, the machine is shared
    rounds = max(args.rounds, 2)
    configs, peak_spec = suite_plan(models, dtypes, args.quick, args.iters, device)
    runner = Runner(args.isolation, threads, args.timeout)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    measured = measure_pairs(configs, runner, rounds, peak_spec)
    meta = {**environment(), "device": device, "threads": threads, "rounds": rounds,
            "iters": args.iters, "quick": args.quick, "dtypes": dtypes, "started": started,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}  # fmt: skip
    if device == "cuda":
        import torch

        meta["gpu"] = torch.cuda.get_device_name(0)
    report = {"meta": meta, **measured}
    out = fused_out(args.out)
    atomic_write_text(out, json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if any("error" in row for row in report["comparisons"]) else 0
