"""prefixtune bench: measure prefixtune against PEFT's PrefixTuningConfig on one machine, in one
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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefixtune.bench.report import COMPILED, RATE_KEYS
from prefixtune.bench.runner import RESULT_MARK, TIMED, Runner, memory_pass, worker_main
from prefixtune.core.atomic_files import atomic_write_text

__all__ = ["RESULT_MARK", "add_arguments", "build_plan", "resolve_dtypes", "run"]

SUITES = ("train", "generate", "multitenant", "long", "mfu", "real", "kernels")
BENCH_MODELS = ("gpt2-small-random", "smollm2", "smollm2-random", "tiny-gpt2", "tiny-llama")
DEFAULT_MODELS = {
    "train": ["gpt2-small-random", "smollm2"],
    "mfu": ["gpt2-small-random", "smollm2"],
}

FULL = {
    "train": {"batch": 8, "seq": 128, "prefix_lens": (10, 200)},
    "long": {"batch": 4, "seq": 1024, "prefix_len": 200, "target_tail": 64},
    "generate": {"prompts": 8, "new_tokens": 32, "prefix_len": 10, "prompt_min": 16,
                 "prompt_max": 48},
    "real": {"examples": 64, "batch": 8, "prefix_len": 10},
    "kernels": {"queries": (64, 128, 256, 512, 1024), "prefix_lens": (10, 200), "rows": 1024,
                "vocab": 49152},
    "mlp_hidden": 512,
}  # fmt: skip
QUICK = {
    "train": {"batch": 2, "seq": 16, "prefix_lens": (2, 6)},
    "long": {"batch": 2, "seq": 64, "prefix_len": 6, "target_tail": 8},
    "generate": {"prompts": 8, "new_tokens": 8, "prefix_len": 4, "prompt_min": 4,
                 "prompt_max": 12},
    "real": {"examples": 16, "batch": 4, "prefix_len": 4},
    "kernels": {"queries": (16, 64), "prefix_lens": (4,), "rows": 64, "vocab": 512},
    "mlp_hidden": 16,
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        nargs="+",
        choices=(*SUITES, "all"),
        default=["all"],
        help="what to measure (default: all)",
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
        "bf16 (it is emulated, 6-30x slower, on AVX2-only CPUs)",
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
        "`python -m prefixtune.bench.suites --worker` each (slower start)",
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


# ------------------------------------------------------------------------------ the plan


def resolve_dtypes(requested: list[str]) -> tuple[list[str], str | None]:
    """The dtypes to run, and a note when bf16 was left out because the CPU lacks it."""
    from prefixtune.core.models import native_bf16

    dtypes: list[str] = []
    note = None
    for name in requested:
        if name == "auto":
            dtypes.append("fp32")
            if native_bf16("cpu"):
                dtypes.append("bf16")
            else:
                note = ("bf16 not run: this CPU has no native bf16 (auto picks fp32); "
                        "pass --dtypes fp32 bf16 to measure the emulated path anyway")  # fmt: skip
        else:
            dtypes.append(name)
    return list(dict.fromkeys(dtypes)), note


def _train_specs(model: str, dtype: str, shapes: dict, base: dict,
                 compile: bool) -> list[tuple[str, dict]]:  # fmt: skip
    train = shapes["train"]
    common = {**base, "kind": "train", "model": model, "dtype": dtype, "batch": train["batch"],
              "seq": train["seq"]}  # fmt: skip
    specs = []
    for length in train["prefix_lens"]:
        for reparam in (True, False):
            name = f"train/{model}/{dtype}/P{length}/{{}}-{'mlp' if reparam else 'table'}"
            spec = {**common, "prefix_len": length, "reparam": reparam, "compile": False}
            specs += [(name.format(impl), {**spec, "impl": impl}) for impl in ("ours", "peft")]
            if compile:
                specs.append((name.format("ours") + COMPILED, {**spec, "impl": "ours",
                                                               "compile": True}))  # fmt: skip
    for impl, label in (("finetune", "finetune"), ("frozen", "frozen-floor")):
        spec = {**common, "impl": impl, "prefix_len": 0, "reparam": False, "compile": False}
        specs.append((f"train/{model}/{dtype}/{label}", spec))
    return specs


def build_plan(suites: list[str], models: list[str] | None, dtypes: list[str], quick: bool,
               iters: int, warmup: int,
               compile: bool = False) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """(name, worker spec) for every configuration of the chosen suites, without repeats.
    With `compile`, prefixtune's training configs also run under torch.compile (*-compiled)."""
    shapes = QUICK if quick else FULL
    base = {"iters": iters, "warmup": warmup, "seed": 0, "mlp_hidden": shapes["mlp_hidden"]}
    chosen = list(SUITES) if "all" in suites else suites
    plan: dict[str, dict[str, Any]] = {}

    def models_for(suite: str) -> list[str]:
        return models or (["tiny-llama"] if quick else DEFAULT_MODELS.get(suite, ["smollm2"]))

    for suite in chosen:
        if suite == "kernels":
            plan.update(_kernel_specs(shapes["kernels"], base, dtypes))
            continue
        for model in models_for(suite):
            if suite in ("train", "mfu"):
                plan[f"check/{model}/equal-loss"] = {
                    "kind": "equal_loss", "model": model, "prefix_len": shapes["train"]
                    ["prefix_lens"][0], "reparam": True, "mlp_hidden": base["mlp_hidden"],
                    "batch": 2, "seq": 16, "seed": 0,
                }  # fmt: skip
            for dtype in dtypes:
                plan.update(_suite_specs(suite, model, dtype, shapes, base, compile))
        if suite == "mfu":
            plan["mfu/peak"] = {"kind": "peak", "dtypes": ["fp32", "bf16"], "quick": quick}
    return list(plan.items())


def _kernel_specs(shapes: dict, base: dict, dtypes: list[str]) -> dict[str, dict[str, Any]]:
    """Cross-entropy; the attention sweep in each of the run's dtypes (bf16 where it runs)."""
    specs = {f"kernels/cross-entropy/{impl}": {**base, "kind": "cross_entropy", "impl": impl,
                                               "rows": shapes["rows"], "vocab": shapes["vocab"]}
             for impl in ("ours", "torch")}  # fmt: skip
    for dtype in dtypes:
        for length in shapes["queries"]:
            for prefix in shapes["prefix_lens"]:
                for impl in ("ours", "sdpa", "math"):
                    specs[f"kernels/attention/{dtype}/T{length}/P{prefix}/{impl}"] = {
                        **base, "kind": "attention", "impl": impl, "dtype": dtype,
                        "queries": length, "prefix_len": prefix}  # fmt: skip
    return specs


def _suite_specs(suite: str, model: str, dtype: str, shapes: dict, base: dict,
                 compile: bool = False) -> dict:  # fmt: skip
    tag = f"{model}/{dtype}"
    if suite == "train":
        return dict(_train_specs(model, dtype, shapes, base, compile))
    if suite == "mfu":  # prefixtune at both lengths and the floor (shared with the train suite)
        specs = dict(_train_specs(model, dtype, shapes, base, compile))
        kept = ("ours-mlp", "ours-mlp" + COMPILED, "frozen-floor")
        return {k: v for k, v in specs.items() if k.endswith(kept)}
    if suite == "long":
        long = shapes["long"]
        common = {**base, "kind": "train", "model": model, "dtype": dtype, "reparam": True,
                  "batch": long["batch"], "seq": long["seq"], "prefix_len": long["prefix_len"],
                  "target_tail": long["target_tail"]}  # fmt: skip
        return {
            f"long/{tag}/{impl}{'-ckpt' if ckpt else ''}": {**common, "impl": impl,
                                                           "checkpointing": ckpt}
            for impl in ("ours", "peft") for ckpt in (False, True)
        }  # fmt: skip
    if suite in ("generate", "multitenant"):
        common = {**base, "kind": suite, "model": model, "dtype": dtype, **shapes["generate"]}
        theirs = "peft" if suite == "generate" else "peft-switching"
        specs = {f"{suite}/{tag}/ours": {**common, "impl": "ours"},
                 f"{suite}/{tag}/{theirs}": {**common, "impl": "peft"}}  # fmt: skip
        if compile:
            specs[f"{suite}/{tag}/ours{COMPILED}"] = {**common, "impl": "ours", "compile": True}
        return specs
    if suite == "real":
        common = {**base, "kind": "real", "model": model, "dtype": dtype, "reparam": True,
                  **shapes["real"]}  # fmt: skip
        impls = ["ours", "peft"] + ([f"ours{COMPILED}"] if compile else [])
        return {f"real/{tag}/{impl}": {**common, "impl": impl.removesuffix(COMPILED),
                                       "compile": impl.endswith(COMPILED)} for impl in impls}  # fmt: skip
    raise ValueError(f"unknown suite {suite!r}")


# ------------------------------------------------------------------------------ command


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


def pool_rounds(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One config's result over two rounds: timed iterations pooled, rates at the new median,
    the higher memory peaks."""
    from prefixtune.bench.common import rates, summarise

    if "median_s" not in first or "median_s" not in later:
        return first if "error" in later else later
    pooled = {**first, **summarise(first["times_s"] + later["times_s"])}
    for key in RATE_KEYS:
        if key in first:  # units per iteration: the same every round
            pooled.update(rates(pooled, first[key] * first["median_s"], key))
    for key in ("peak_rss_mb", "step_extra_mb", "live_peak_mb", "live_step_extra_mb"):
        if key in first and key in later:
            pooled[key] = max(first[key], later[key])
    pooled["rounds"] = first.get("rounds", 1) + 1
    return pooled


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
    dtypes, note = resolve_dtypes(args.dtypes)
    plan = build_plan(args.suite, args.model, dtypes, args.quick, args.iters, args.warmup,
                      args.compile)  # fmt: skip
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
    results: dict[str, Any] = {}
    for round_no in range(1, args.rounds + 1):
        for i, (name, spec) in enumerate(plan, start=1):
            result = runner(spec)
            if args.memory_pass and "median_s" in result and spec["kind"] in TIMED:
                result.update(memory_pass(runner, spec))
            if name in results:
                result = pool_rounds(results[name], result)
            results[name] = {"spec": spec, **result}
            label = f"[{i}/{len(plan)}]" + (f" round {round_no}" if args.rounds > 1 else "")
            print(f"{label} {_line(name, result)}", flush=True)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_report(meta, results, Path(args.out))
    failed = [n for n, r in results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv))
    _parser = argparse.ArgumentParser(prog="python -m prefixtune.bench.suites", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
