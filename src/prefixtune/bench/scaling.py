"""`prefixtune bench --suite scaling`: prefixtune and PEFT side by side as one dimension grows
with the others fixed (input length, prefix length, batch, tenants, model size). Each point runs
in its own worker process; a curve ends at the first point a tool cannot do (out of memory,
refused, predicted over the memory budget or the time budget), and records why."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

SCALING_SUITES = ("scaling",)

BASE = {}  # SmolLM2-135M's architecture (common.SMOLLM2_CONFIG), random weights
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96}  # fmt: skip


def _llama(hidden: int, layers: int, inter: int, kv_heads: int) -> dict[str, int]:
    return {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
            "num_attention_heads": hidden // 64, "num_key_value_heads": kv_heads, "head_dim": 64}  # fmt: skip


# width and depth together, 135M -> 1.4B parameters (SmolLM2-135M, -360M, then wider and deeper)
MODEL_SIZES = [_llama(576, 30, 1536, 3), _llama(960, 32, 2560, 5), _llama(1280, 32, 3584, 5),
               _llama(1536, 32, 4096, 8), _llama(2048, 20, 8192, 8)]  # fmt: skip
TINY_SIZES = [TINY, {**TINY, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}]

FULL = {
    "input_length": {"values": [128 * 2**i for i in range(8)], "batch": 1, "prefix_len": 10},
    "prefix_length": {"values": [1, 2, 8, 64, 512], "seq": 128, "batch": 4},
    "batch": {"values": [2**i for i in range(7)], "seq": 128, "prefix_len": 10},
    "tenants": {"values": [2**i for i in range(8)], "prefix_len": 10, "prompt_len": 16,
                "new_tokens": 8},
    "model_size": {"values": MODEL_SIZES, "seq": 128, "batch": 1, "prefix_len": 10},
    "arch": BASE, "mlp_hidden": 512,
}  # fmt: skip

QUICK = {
    "input_length": {"values": [16, 32, 64], "batch": 1, "prefix_len": 4},
    "prefix_length": {"values": [1, 4], "seq": 16, "batch": 2},
    "batch": {"values": [1, 2], "seq": 16, "prefix_len": 4},
    "tenants": {"values": [1, 2], "prefix_len": 4, "prompt_len": 4, "new_tokens": 3},
    "model_size": {"values": TINY_SIZES, "seq": 16, "batch": 1, "prefix_len": 4},
    "arch": TINY, "mlp_hidden": 16,
}  # fmt: skip

DIMENSIONS = ("input_length", "prefix_length", "batch", "tenants", "model_size")
VARIANTS = {"input_length": ("ours", "ours-ckpt", "peft", "peft-ckpt")}  # others: ours, peft
TOOL = {"ours": "prefixtune", "ours-ckpt": "prefixtune", "peft": "PEFT", "peft-ckpt": "PEFT"}


def curve_points(dim: str, variant: str, grid: dict, base: dict) -> list[tuple[float, dict]]:
    """(x, worker spec) for every point of one curve, smallest first."""
    shape = grid[dim]
    impl = variant.removesuffix("-ckpt")
    common = {**base, "kind": "scaling", "impl": impl, "checkpointing": variant.endswith("-ckpt"),
              "reparam": True, "mlp_hidden": grid["mlp_hidden"], "arch": grid["arch"]}  # fmt: skip
    fixed = {k: v for k, v in shape.items() if k != "values"}
    points = []
    for value in shape["values"]:
        spec = {**common, **fixed, "task": "tenants" if dim == "tenants" else "train"}
        if dim == "model_size":
            from prefixtune.bench.scaling_worker import parameter_count

            spec["arch"] = value
            x: float = parameter_count(value)
        else:
            key = {"input_length": "seq", "prefix_length": "prefix_len"}.get(dim, dim)
            spec[key], x = value, value
        points.append((x, spec))
    return points


def build_curves(quick: bool, device: str, dtype: str, iters: int, warmup: int,
                 dimensions: tuple[str, ...] = DIMENSIONS,
                 exact_malloc: bool = False) -> dict[str, list]:  # fmt: skip
    """{"dim/variant": [(x, spec), ...]} for the chosen dimensions; `exact_malloc` runs every
    CPU point with `bench.common.exact_malloc` (peaks follow live tensors)."""
    grid = QUICK if quick else FULL
    base = {"device": device, "dtype": dtype, "iters": iters, "warmup": warmup, "seed": 0,
            "exact_malloc": exact_malloc and device == "cpu"}  # fmt: skip
    return {f"{dim}/{variant}": curve_points(dim, variant, grid, base)
            for dim in dimensions for variant in VARIANTS.get(dim, ("ours", "peft"))}  # fmt: skip


def _extrapolate(done: list[dict], x: float, key: str) -> float | None:
    """`key` at x from the curve's last two measured points (log-log; one point: linear)."""
    ok = [p for p in done if key in p.get("result", {})]
    if not ok:
        return None
    x2, y2 = ok[-1]["x"], ok[-1]["result"][key]
    slope = 1.0
    if len(ok) > 1:
        x1, y1 = ok[-2]["x"], ok[-2]["result"][key]
        if x2 != x1 and y1 > 0 and y2 > 0:
            slope = min(max(math.log(y2 / y1) / math.log(x2 / x1), 0.0), 3.0)
    return y2 * (x / x2) ** slope


def predict(done: list[dict], x: float, spec: dict) -> dict[str, float]:
    """Predicted peak memory (MB) and step time (s) of the next point."""
    from prefixtune.bench.scaling_worker import parameter_count

    weights = parameter_count(spec["arch"]) * 4 / 2**20  # fp32 weights, resident in any case
    memory = _extrapolate(done, x, "peak_rss_mb") or 0.0
    if done and "step_extra_mb" in done[-1]["result"]:  # the step's own memory grows, the rest
        last = done[-1]["result"]  # (weights, runtime) stays: extrapolate the step part alone
        memory = last["rss_before_mb"] + max(_extrapolate(done, x, "step_extra_mb") or 0.0, 0.0)
    memory = max(memory, weights)
    return {"peak_mb": memory, "step_s": _extrapolate(done, x, "median_s") or 0.0}


def stop_reason(result: dict[str, Any], budget_mb: float) -> str | None:
    """Why a curve ends at this result, or None when it goes on."""
    from prefixtune.bench.scaling_worker import OOM_MARKS

    if "oom" in result:
        return f"out of memory ({result['oom']})"
    if "refused" in result:
        return f"refused ({result['refused']})"
    error = result.get("error")
    if error:
        if error.startswith("worker timed out"):
            return "over the time budget (worker timed out)"
        if error.startswith(("worker exit code -9", "worker exit code 137")):
            return "out of memory (worker killed)"
        if any(mark in error.lower() for mark in OOM_MARKS):
            return f"out of memory ({error[:300]})"
        return f"error ({error[:300]})"
    if result.get("peak_rss_mb", 0) > budget_mb:
        return f"over memory budget (measured peak {result['peak_rss_mb']:.0f} MB)"
    return None


def run_curve(points: list[tuple[float, dict]], runner: Callable[[dict], dict],
              budget_mb: float, point_budget_s: float,
              log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Measure a curve's points in order until one ends it; the points and why it stopped."""
    done: list[dict] = []
    for x, spec in points:
        guess = predict(done, x, spec)
        if guess["peak_mb"] > budget_mb:
            why = f"over memory budget (predicted {guess['peak_mb']:.0f} MB > {budget_mb:.0f} MB)"
            return {"points": done, "stopped_at": x, "stopped": why}
        if guess["step_s"] > point_budget_s:
            why = f"over the time budget (predicted {guess['step_s']:.0f} s a step > {point_budget_s:.0f} s)"  # fmt: skip
            return {"points": done, "stopped_at": x, "stopped": why}
        light = guess["step_s"] * 4 < point_budget_s  # a long step runs once, without warm-up
        spec = {**spec, "memory_limit_mb": budget_mb, "time_cap_s": point_budget_s,
                "warmup": spec["warmup"] if light else 0}  # fmt: skip
        result = runner(spec)
        why = stop_reason(result, budget_mb)
        log(f"  x={x:g}: " + (why or f"{result['median_s']:.3f} s/step, "
                              f"peak {result['peak_rss_mb']:.0f} MB"))  # fmt: skip
        if why:
            return {"points": done, "stopped_at": x, "stopped": why, "failed": result}
        done.append({"x": x, "spec": spec, "result": result})
    return {"points": done, "stopped_at": None, "stopped": "end of the grid"}


def run_scaling(curves: dict[str, list], runner: Callable[[dict], dict], budget_mb: float,
                point_budget_s: float, log: Callable[[str], None] = print,
                done: Callable[[dict], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every curve, one after the other: {"dim/variant": run_curve(...)}; `done` sees the
    results so far after each curve (to write them as they come)."""
    out: dict[str, Any] = {}
    for name, points in curves.items():
        log(f"{name}:")
        out[name] = run_curve(points, runner, budget_mb, point_budget_s, log)
        if done is not None:
            done(out)
    return out
