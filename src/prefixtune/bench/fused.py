"""Fused frozen projections (core/fuse.py) side by side with the unfused model, in one run.

    nice -n 10 python -m prefixtune.bench.fused --out docs/results/bench/fused-projections.json

Each configuration runs unfused and fused in fresh worker processes (runner.Runner), alternating
round by round so that a busy moment on a shared machine hits both; a config's figure is the
median of all its timed iterations over the rounds. Training: the fixed-shape prefixtune step
(train.run_train, MFU against the measured matmul peak of the same dtype); decoding: batched
greedy generation with one prefix (generate.run_generate; the fused tokens must equal the
unfused ones).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

from prefixtune.bench.common import environment
from prefixtune.bench.plan import FULL, QUICK
from prefixtune.bench.runner import Runner
from prefixtune.core.atomic_files import atomic_write_json


def specs(model: str, dtypes: list[str], quick: bool, iters: int) -> dict[str, dict[str, Any]]:
    """name -> spec (without the fuse flag) of every configuration measured."""
    shapes = QUICK if quick else FULL
    base = {"iters": iters, "warmup": 1, "seed": 0, "mlp_hidden": shapes["mlp_hidden"],
            "model": model}  # fmt: skip
    train = shapes["train"]
    found = {}
    for dtype in dtypes:
        found[f"train/{model}/{dtype}/P{train['prefix_lens'][0]}/ours-mlp"] = {
            **base, "kind": "train", "impl": "ours", "dtype": dtype, "batch": train["batch"],
            "seq": train["seq"], "prefix_len": train["prefix_lens"][0], "reparam": True}  # fmt: skip
        found[f"generate/{model}/{dtype}/ours"] = {
            **base, "kind": "generate", "impl": "ours", "dtype": dtype, **shapes["generate"]}  # fmt: skip
    return found


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one config as one: all timed iterations, their median and the rate."""
    bad = [r for r in runs if "error" in r or "refused" in r]
    if bad:
        return {"error": bad[0].get("error") or bad[0].get("refused")}
    times = [t for r in runs for t in r["times_s"]]
    median = statistics.median(times)
    pooled = {"times_s": times, "median_s": median, "rounds": len(runs),
              "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in runs)}  # fmt: skip
    if "useful_flops" in runs[0]:
        pooled["tokens_per_s"] = runs[0]["tokens_per_step"] / median
        pooled["useful_gflops"] = runs[0]["useful_flops"]["total"] / median / 1e9
        pooled["loss"] = runs[0]["loss"]
    else:
        pooled["new_tokens_per_s"] = runs[0]["new_tokens_total"] / median
        pooled["outputs"] = runs[0]["outputs"]
    return pooled


def compare(name: str, plain: dict, fused: dict, peak: dict) -> dict[str, Any]:
    """Ratios fused / unfused (rate and MFU) of one config."""
    if "error" in plain or "error" in fused:
        return {"key": name, "error": plain.get("error") or fused.get("error")}
    rate = "tokens_per_s" if "tokens_per_s" in plain else "new_tokens_per_s"
    row = {"key": name, "rate": rate, "unfused": plain[rate], "fused": fused[rate],
           "speedup": fused[rate] / plain[rate]}  # fmt: skip
    dtype = name.split("/")[2]
    if "useful_gflops" in plain and dtype in peak:
        row["mfu_unfused"] = plain["useful_gflops"] / peak[dtype]["gflops"]
        row["mfu_fused"] = fused["useful_gflops"] / peak[dtype]["gflops"]
        row["loss_diff"] = abs(plain["loss"] - fused["loss"])
    if "outputs" in plain:
        row["same_tokens"] = plain["outputs"] == fused["outputs"]
    return row


def measure_pairs(configs: dict[str, dict], runner: Callable[[dict], dict], rounds: int,
                  peak_spec: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Every config unfused and fused, alternating round by round; then the matmul peak of
    `peak_spec` (MFU) and the ratios. `runner` runs one spec (runner.Runner, or run_spec)."""
    runs: dict[str, list[dict]] = {f"{n}/{v}": [] for n in configs for v in ("unfused", "fused")}
    for round_index in range(rounds):
        order = ("unfused", "fused") if round_index % 2 == 0 else ("fused", "unfused")
        for name, spec in configs.items():
            for variant in order:
                runs[f"{name}/{variant}"].append(runner({**spec, "fuse": variant == "fused"}))
    peak = runner(peak_spec)
    results = {key: _pooled(value) for key, value in runs.items()}
    rows = [compare(n, results[f"{n}/unfused"], results[f"{n}/fused"], peak) for n in configs]
    for result in results.values():
        result.pop("outputs", None)
    return {"peak": peak, "comparisons": rows, "results": results}


def suite_plan(models: list[str], dtypes: list[str], quick: bool, iters: int,
               device: str = "cpu") -> tuple[dict[str, dict], dict[str, Any]]:  # fmt: skip
    """`prefixtune bench --suite fused`: (the configs of every model, the peak spec), on
    `device` (the CPU specs are the module's own)."""
    on = {} if device == "cpu" else {"device": device}
    configs = {name: {**spec, **on} for model in models
               for name, spec in specs(model, dtypes, quick, iters).items()}  # fmt: skip
    return configs, {"kind": "peak", "dtypes": dtypes, "quick": quick, **on}


def markdown(report: dict[str, Any]) -> str:
    """The fused/unfused table of a report."""
    lines = ["# Fused frozen projections (core/fuse.py)", "",
             "| config | rate | unfused /s | fused /s | speedup | MFU unfused / fused | "
             "same tokens |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["comparisons"]:
        if "error" in row:
            lines.append(f"| {row['key']} | error: {row['error'][:120]} | | | | | |")
            continue
        mfu = (f"{row['mfu_unfused']:.1%} / {row['mfu_fused']:.1%}"
               if "mfu_unfused" in row else "")  # fmt: skip
        lines.append(f"| {row['key']} | {row['rate']} | {row['unfused']:.1f} | "
                     f"{row['fused']:.1f} | {row['speedup']:.2f}x | {mfu} | "
                     f"{row.get('same_tokens', '')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    runner = Runner("subprocess", args.threads, args.timeout)
    configs = specs(args.model, args.dtypes, args.quick, args.iters)
    peak_spec = {"kind": "peak", "dtypes": args.dtypes, "quick": args.quick}
    measured = measure_pairs(configs, runner, args.rounds, peak_spec)
    return {"meta": {**environment(), "threads": args.threads, "rounds": args.rounds,
                     "iters": args.iters, "quick": args.quick, "command": " ".join(sys.argv)},
            **measured}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Where to write the results JSON.")
    parser.add_argument("--model", default="smollm2", help="Bench model name (bench/common.py).")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], help="fp32 and/or bf16.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds per config.")
    parser.add_argument("--iters", type=int, default=3, help="Timed iterations per worker.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per worker.")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds per worker.")
    parser.add_argument("--quick", action="store_true", help="The bench's --quick shapes.")
    args = parser.parse_args(argv)
    report = run(args)
    atomic_write_json(args.out, report)
    print(json.dumps(report["comparisons"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
