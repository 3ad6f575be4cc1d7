"""Draw the training curves of one or several runs (their log.jsonl) into one PNG: a panel
per metric, a line per run labelled by its directory name.

    prefixtune plot runs/e2e runs/e2e-len5 --out curves.png
    prefixtune plot runs/e2e --metric loss --metric lr
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefixtune.evaluation.curves import DEFAULT_METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories written by `prefixtune train` (each with a log.jsonl)")  # fmt: skip
    parser.add_argument(
        "--out", help="PNG file to write (default: RUN/curves.png of the first run)"
    )
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="a log.jsonl key to draw, repeatable: loss, dev_loss, lr, "
                             f"tokens_per_s, ... (default: {' and '.join(DEFAULT_METRICS)})")  # fmt: skip
    parser.add_argument("--title", default="", help="a title over the panels")


def run(args: argparse.Namespace) -> int:
    from prefixtune.evaluation.curves import collect_curves, plot_curves, run_labels

    metrics = list(dict.fromkeys(args.metric or DEFAULT_METRICS))
    curves = collect_curves(args.runs, metrics)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "curves.png"
    plot_curves(curves, out, title=args.title)
    for curve in curves:
        print(f"{curve.run}  {curve.metric}: {len(curve.steps)} points, steps "
              f"{curve.steps[0]}..{curve.steps[-1]}, last {curve.values[-1]:.4g}")  # fmt: skip
    drawn = {(c.run, c.metric) for c in curves}
    for metric in metrics:
        for label in run_labels(args.runs):
            if (label, metric) not in drawn:
                print(f"{label}  {metric}: not in its log.jsonl (not drawn)")
    print(f"wrote {out}")
    return 0
