"""Scaling results -> fitted exponents (least squares on log-log), the headline (the longest input
each tool trains on within the memory budget), markdown and log-log plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefixtune.bench.scaling import TOOL

AXIS = {"input_length": "input length (tokens)", "prefix_length": "prefix length",
        "batch": "batch size", "tenants": "tenants (one prefix each)",
        "model_size": "model parameters"}  # fmt: skip
MEASURES = {"median_s": "time per step (s)", "peak_rss_mb": "peak memory (MB)"}


def fit_power(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """y = c * x^k by least squares on (log x, log y): k, c and r^2; None under two points."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2 or len({a for a, _ in pairs}) < 2:
        return None
    n = len(pairs)
    mx = sum(a for a, _ in pairs) / n
    my = sum(b for _, b in pairs) / n
    sxx = sum((a - mx) ** 2 for a, _ in pairs)
    k = sum((a - mx) * (b - my) for a, b in pairs) / sxx
    c = my - k * mx
    total = sum((b - my) ** 2 for _, b in pairs)
    residual = sum((b - (c + k * a)) ** 2 for a, b in pairs)
    return {"exponent": k, "coefficient": math.exp(c),
            "r2": 1.0 - residual / total if total else 1.0, "points": n}  # fmt: skip


def fits(curves: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per curve and measure (time per step, peak memory): the fitted power law."""
    out = {}
    for name, curve in curves.items():
        xs = [p["x"] for p in curve["points"]]
        out[name] = {key: fit_power(xs, [p["result"][key] for p in curve["points"]])
                     for key in (*MEASURES, "step_extra_mb")}  # fmt: skip
    return out


def headline(curves: dict[str, Any], budget_mb: float) -> dict[str, Any]:
    """The longest input each tool trains on within the budget (any of its variants)."""
    best: dict[str, dict[str, Any]] = {}
    for name, curve in curves.items():
        dim, variant = name.split("/", 1)
        if dim != "input_length" or not curve["points"]:
            continue
        tool, longest = TOOL[variant], curve["points"][-1]["x"]
        if longest > best.get(tool, {}).get("longest", 0):
            best[tool] = {"longest": longest, "variant": variant,
                          "peak_mb": curve["points"][-1]["result"]["peak_rss_mb"],
                          "stopped": curve["stopped"]}  # fmt: skip
    ours, theirs = best.get("prefixtune"), best.get("PEFT")
    ratio = ours["longest"] / theirs["longest"] if ours and theirs else None
    return {"budget_mb": budget_mb, "tools": best, "ratio": ratio,
            "target": ">= 4x PEFT's longest input in the same memory",
            "met": ratio is not None and ratio >= 4}  # fmt: skip


EXTRAPOLATE_AT_MOST = 100  # times the longest input measured: farther, a fit says nothing


def memory_limits(curves: dict[str, Any], fitted: dict[str, Any],
                  budget_mb: float) -> dict[str, float | None]:  # fmt: skip
    """Per input-length curve, the length where the fitted step memory (c * T^k over what the
    process held before the step) would reach the budget: an extrapolation, not a measurement.
    None where that lies beyond EXTRAPOLATE_AT_MOST x the longest input measured."""
    out: dict[str, float | None] = {}
    for name, curve in curves.items():
        fit = fitted[name]["step_extra_mb"]
        if not name.startswith("input_length/") or not fit or fit["exponent"] <= 0:
            continue
        room = budget_mb - curve["points"][-1]["result"]["rss_before_mb"]
        if room <= 0:
            out[name] = 0.0
            continue
        log_length = math.log(room / fit["coefficient"]) / fit["exponent"]  # no float overflow
        far = log_length > math.log(EXTRAPOLATE_AT_MOST * curve["points"][-1]["x"])
        out[name] = None if far else math.exp(log_length)
    return out


def summarise(curves: dict[str, Any], budget_mb: float) -> dict[str, Any]:
    fitted = fits(curves)
    return {"fits": fitted, "headline": headline(curves, budget_mb),
            "extrapolated_longest_input": memory_limits(curves, fitted, budget_mb)}  # fmt: skip


def _fmt(fit: dict | None) -> str:
    return "-" if fit is None else f"{fit['exponent']:.2f} (r² {fit['r2']:.2f})"


def markdown(report: dict[str, Any]) -> str:
    """Curves (points, where and why each stopped, exponents) and the headline, as markdown."""
    head = report["headline"]
    lines = [f"Memory budget {head['budget_mb'] / 1024:.1f} GB; device {report['meta']['device']}.",
             "", "| curve | points (x: s/step, peak MB) | stopped at | why | time exp. | memory exp. |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, curve in report["curves"].items():
        points = "; ".join(f"{p['x']:g}: {p['result']['median_s']:.3g}, "
                           f"{p['result']['peak_rss_mb']:.0f}" for p in curve["points"])  # fmt: skip
        stop = "-" if curve["stopped_at"] is None else f"{curve['stopped_at']:g}"
        fit = report["fits"][name]
        lines.append(f"| {name} | {points or '-'} | {stop} | {curve['stopped']} | "
                     f"{_fmt(fit['median_s'])} | {_fmt(fit['peak_rss_mb'])} |")  # fmt: skip
    lines += ["", "Longest input trained within the budget:"]
    for tool, best in head["tools"].items():
        lines.append(f"- {tool}: {best['longest']:g} tokens ({best['variant']}, peak "
                     f"{best['peak_mb']:.0f} MB; next point: {best['stopped']})")  # fmt: skip
    for name, length in report.get("extrapolated_longest_input", {}).items():
        where = (
            f"near {length:,.0f} tokens"
            if length is not None
            else f"beyond {EXTRAPOLATE_AT_MOST}x the longest input measured, too far to say"
        )
        lines.append(f"- {name}: the fitted step memory reaches the budget {where} "
                     "(extrapolated, not measured)")  # fmt: skip
    if head["ratio"] is not None:
        verdict = "met" if head["met"] else "not met"
        lines.append(f"- ratio {head['ratio']:.1f}x (target {head['target']}: {verdict})")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], stem: Path) -> list[Path]:
    """One log-log PNG per dimension (time per step and peak memory; an x marks where a curve
    stopped), written atomically beside the JSON as <stem>-<dimension>.png."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefixtune.core.atomic_files import atomic_write

    dims = dict.fromkeys(name.split("/", 1)[0] for name in report["curves"])
    written = []
    for dim in dims:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, curve in report["curves"].items():
            if not name.startswith(dim + "/") or not curve["points"]:
                continue
            xs = [p["x"] for p in curve["points"]]
            for axis, key in zip(axes, MEASURES, strict=True):
                ys = [p["result"][key] for p in curve["points"]]
                fit = report["fits"][name][key]
                label = name.split("/", 1)[1] + (f" (k={fit['exponent']:.2f})" if fit else "")
                line = axis.loglog(xs, ys, marker="o", label=label)[0]
                if curve["stopped_at"] is not None:
                    axis.plot([curve["stopped_at"]], [ys[-1]], "x", color=line.get_color(), ms=9)
        for axis, key in zip(axes, MEASURES, strict=True):
            axis.set_xlabel(AXIS.get(dim, dim))
            axis.set_ylabel(MEASURES[key])
            axis.grid(True, which="both", alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
        figure.suptitle(f"scaling: {dim} (x: where a curve stopped; see the JSON for why)")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        path = stem.with_name(f"{stem.name}-{dim}.png")
        data = buffer.getvalue()
        atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
        written.append(path)
    return written
