"""`prefixtune reproduce <experiment> --scale cpu`: the paper's tables and figures.

Experiments: lowdata (Figure 3), length (Figure 4), init (Figure 5), table1, table1-webnlg and
table1-dart (Table 1), xsum and xsum-sports (Tables 2-3). Two phases: the LR tuning runs (dev
only; a grid whose best value is at an edge grows past it, round by round), then every seed run
at its cell's chosen LR (test). Each run's result is a file under
docs/results/<experiment>/ (tune/, runs/: commit them); a run with its file is never redone,
and training resumes from its checkpoint under runs/reproduce/. The report
(results.md, results.csv, <experiment>.png) is built from the result files alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefixtune.config import ConfigError
from prefixtune.experiments.claims import comparisons
from prefixtune.experiments.grid import GRIDS, check_experiment
from prefixtune.experiments.report import report
from prefixtune.experiments.runner import EXECUTORS, run_all
from prefixtune.experiments.runs import Context, finished, test_items
from prefixtune.experiments.scales import SCALES
from prefixtune.experiments.tables import claims_table, tuning_table
from prefixtune.experiments.tuning import pairs_of, seed_runs, tuning_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=sorted(GRIDS), help="which table or figure")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES),
                        help="tiny (smoke), cpu (2 cores: full E2E test, beam 5, 3 seeds), "
                             "small (quick greedy preview), full (GPU)")  # fmt: skip
    parser.add_argument("--model", default="",
                        help="base model (default: embedded SmolLM2-135M; gemma3-270m: embedded "
                             "Gemma-3-270M; results then go to <experiment>-<model>)")  # fmt: skip
    parser.add_argument(
        "--runs",
        default="runs/reproduce",
        help="where training runs (checkpoints, artifacts) are kept",
    )
    parser.add_argument(
        "--results",
        default="docs/results",
        help="where result files, tables and plots go (commit them)",
    )
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the tables and plot from the runs finished so "
                             "far (marked partial when some are missing)")  # fmt: skip
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process (or Ray task) with "
        "cores/jobs threads (CPU: one per core is fastest; GPU: keep 1)",
    )
    parser.add_argument(
        "--executor",
        default="processes",
        choices=EXECUTORS,
        help="processes: --jobs spawned workers; ray: each run a Ray task (a "
        "local instance of --jobs CPUs, or the cluster at RAY_ADDRESS)",
    )
    parser.add_argument("--cells", default="",
                        help="comma-separated cell names to run (e.g. prefix,finetune for Table "
                             "1's main row; names as in the result files); empty: all")  # fmt: skip
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="resamples of the paired bootstrap test in the report",
    )


def _selected(cells: list, names: str) -> list:
    """The cells named in --cells (all when empty); an unknown name is an error naming them all."""
    if not names:
        return cells
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {c.name for c in cells})
    if unknown:
        raise ConfigError(f"--cells: unknown {unknown}; this experiment has "
                          f"{[c.name for c in cells]}")  # fmt: skip
    return [c for c in cells if c.name in wanted]


def _slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in Path(model).name)


def run(args: argparse.Namespace) -> int:
    check_experiment(args.experiment, args.scale)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.bootstrap < 1:
        raise ConfigError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    scale = SCALES[args.scale]
    suffix = f"-{_slug(args.model)}" if args.model else ""
    name = args.experiment + suffix
    ctx = Context(Path(args.runs) / f"{name}-{args.scale}", Path(args.results) / name,
                  args.scale, args.model)  # fmt: skip
    cells = _selected(GRIDS[args.experiment](scale), args.cells)
    tuned = _tune(args, cells, scale, ctx)
    seeds = seed_runs(cells, tuned, scale)
    if args.report_only:
        rows = [row for s in seeds if (row := finished(s, ctx)) is not None]
        if not rows:
            raise ConfigError(f"{ctx.out}: no finished runs to report (run without --report-only)")
    else:
        print(f"phase 2: {len(seeds)} seed runs (test)", flush=True)
        rows = run_all(seeds, ctx, args.jobs, args.executor)
    command = f"prefixtune reproduce {args.experiment} --scale {args.scale}"
    if args.model:
        command += f" --model {args.model}"
    if args.cells:
        command += f" --cells {args.cells}"
    planned = sum(len(pairs_of(c, scale)) for c in cells)
    claims = _claims(args, cells, rows, ctx, scale)
    text = report(args.experiment, args.scale, rows, ctx.out, command, planned=planned,
                  claims=claims, tuning=tuning_table(rows))  # fmt: skip
    print(text)
    return 0


def _tune(args, cells: list, scale: dict, ctx: Context) -> dict[str, dict]:
    """Phase 1: the tuning rows by run name. A round trains every grid value not yet run; a grid
    whose best value sits at an edge then grows past it, and the next round trains that value.
    --report-only trains nothing and reads the rows that are there."""
    tuned: dict[str, dict] = {}
    round_ = 0
    while True:  # ends: each round adds rows, and a grid grows by at most lr_extend values
        round_ += 1
        todo = [s for s in tuning_runs(cells, scale, tuned) if s.name not in tuned]
        if args.report_only:
            rows = [(s, row) for s in todo if (row := finished(s, ctx)) is not None]
        elif todo:
            print(f"phase 1, round {round_}: {len(todo)} tuning runs (dev only)", flush=True)
            rows = list(zip(todo, run_all(todo, ctx, args.jobs, args.executor), strict=True))
        else:
            rows = []
        if not rows:
            return tuned
        tuned.update((s.name, row) for s, row in rows)


def _claims(args, cells, rows, ctx: Context, scale: dict) -> str:
    """The claim tests' markdown (none for summarisation: no BLEU to resample)."""
    from prefixtune.evaluation.predictor import task_of

    first = cells[0]
    task = task_of(first.train["data"])
    if task == "xsum":
        return ""
    items = test_items(first.train["data"], first.test_split,
                       {**scale, **first.evaluation}["test"])  # fmt: skip
    return claims_table(comparisons(args.experiment, cells), rows, ctx.out, items, task,
                        args.bootstrap)  # fmt: skip
