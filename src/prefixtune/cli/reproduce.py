"""`prefixtune reproduce <experiment> --scale small`: the paper's tables and figures.

Experiments: lowdata (Figure 3), length (Figure 4), init (Figure 5), table1 and table1-webnlg
(Table 1 layout), xsum and xsum-sports (Tables 2-3: summarisation and news-to-sports). Each
writes docs/results/<experiment>/{results.csv, results.md, <name>.png};
runs live under runs/reproduce/<experiment>-<scale>/ and finished ones are never redone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefixtune.config import ConfigError
from prefixtune.experiments.grid import GRIDS, SCALES, check_experiment, finished_row, run_one
from prefixtune.experiments.report import report
from prefixtune.experiments.runner import run_parallel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=sorted(GRIDS), help="which table or figure")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES),
                        help="tiny (smoke), small (this CPU, ~1 h), full (GPU)")  # fmt: skip
    parser.add_argument("--model", default="", help="base model (default: embedded SmolLM2-135M)")
    parser.add_argument("--runs", default="runs/reproduce", help="where the runs are kept")
    parser.add_argument("--results", default="docs/results", help="where tables and plots go")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the tables and plot from the runs finished so "
                             "far (marked partial when some are missing)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process with cores/jobs "
                             "threads (CPU: one per core is fastest; GPU: keep 1)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    check_experiment(args.experiment, args.scale)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    scale = SCALES[args.scale]
    root = Path(args.runs) / f"{args.experiment}-{args.scale}"
    grid = GRIDS[args.experiment](scale)
    if args.report_only:
        rows = [row for spec in grid if (row := finished_row(spec, root)) is not None]
        if not rows:
            raise ConfigError(f"{root}: no finished runs to report (run without --report-only)")
    elif args.jobs == 1:
        rows = []
        for index, spec in enumerate(grid, 1):
            print(f"[{index}/{len(grid)}] {spec.name}", flush=True)
            rows.append(run_one(spec, root, scale, args.model))
    else:
        rows = run_parallel(grid, root, scale, args.model, args.jobs)
    command = f"prefixtune reproduce {args.experiment} --scale {args.scale}"
    if args.model:
        command += f" --model {args.model}"
    out = Path(args.results) / args.experiment
    print(report(args.experiment, args.scale, rows, out, command, planned=len(grid)))
    return 0
