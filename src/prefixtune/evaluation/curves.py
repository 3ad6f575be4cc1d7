"""Training curves: a run's log.jsonl read back, and one PNG of several runs' curves.

A run directory's log.jsonl has one JSON object per logged step (`loss`, `lr`, `tokens_per_s`)
and per evaluation (`dev_loss`). A resumed run re-logs the steps after its checkpoint; the
last line of a step wins, as in the resumed run's own numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.core.atomic_files import atomic_write

LOG_FILE = "log.jsonl"
DEFAULT_METRICS = ("loss", "dev_loss")


@dataclass
class Curve:
    """One run's values of one metric, by step."""

    run: str
    metric: str
    steps: list[int]
    values: list[float]


def read_log(run: str | Path) -> list[dict[str, Any]]:
    """The records of RUN/log.jsonl; errors name the directory, or the file and line."""
    run = Path(run)
    path = run / LOG_FILE
    if not run.is_dir():
        raise ConfigError(f"{run}: not a directory (pass run directories written by `train`)")
    if not path.is_file():
        raise ConfigError(f"{run}: no {LOG_FILE} here (pass a run directory written by `train`)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ConfigError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        records.append(record)
    return records


def metric_series(records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in step order; a step logged twice keeps its last value."""
    latest: dict[int, float] = {}
    for record in records:
        value = record.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool):
            latest[record["step"]] = float(value)
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name; the path as given where two runs share a name."""
    names = [Path(r).name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs, strict=True)]


def collect_curves(runs: Sequence[str | Path], metrics: Sequence[str]) -> list[Curve]:
    """Every (run, metric) curve the logs hold; a metric no run logged is an error naming
    the metrics they did log."""
    logs = [read_log(run) for run in runs]
    curves = []
    for metric in metrics:
        found = [Curve(label, metric, *metric_series(records, metric))
                 for label, records in zip(run_labels(runs), logs, strict=True)]  # fmt: skip
        found = [c for c in found if c.steps]
        if not found:
            logged = sorted({k for records in logs for r in records for k in r} - {"step"})
            raise ConfigError(
                f"--metric {metric}: no run logged it; the logs hold {', '.join(logged) or 'none'}"
            )
        curves.extend(found)
    return curves


def plot_curves(curves: list[Curve], path: str | Path, *, title: str = "") -> Path:
    """One panel per metric, one line per run (labelled by run), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = list(dict.fromkeys(c.metric for c in curves))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    try:
        for ax, metric in zip(axes[0], metrics, strict=True):
            for curve in (c for c in curves if c.metric == metric):
                few = len(curve.steps) <= 20  # sparse points (dev evaluations) get markers
                ax.plot(curve.steps, curve.values, marker="o" if few else None, label=curve.run)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
