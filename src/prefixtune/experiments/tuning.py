"""Learning rates chosen on dev, never test: cells expanded into tuning runs and seed runs.

Each cell trains once per value of its method's LR grid with the first seed pair; the dev loss
(or dev BLEU, the scale's `select`) picks the value; every seed pair then trains at it. The
first pair's run at the chosen value IS the tuning run (same name, same training), so it is only
scored on test, not trained again.

A best value at an edge of the grid says nothing of what lies past it, so the grid grows one
step past that edge (the ratio of the two values there) and the new value trains too, up to the
scale's `lr_extend` steps; a pick still at an edge after them is recorded as such.
"""

from __future__ import annotations

import math
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.experiments.grid import Cell, RunSpec
from prefixtune.experiments.scales import lr_grid, seed_pairs


class TuningUnfinished(ConfigError):
    """A cell's tuning run has not finished yet: its seed runs wait (other cells go on)."""


UNFINISHED = object()  # a tuning run without a result row, unlike a row whose score is None


def run_name(cell: Cell, lr: float, pair: tuple[int, int]) -> str:
    subsample, seed = pair
    return f"{cell.name}-lr{lr:g}-s{seed}" + (f"-d{subsample}" if cell.resample else "")


def pairs_of(cell: Cell, scale: dict[str, Any]) -> list[tuple[int, int]]:
    pairs = seed_pairs(scale, cell.resample)
    return pairs[: cell.seeds] if cell.seeds else pairs


def _spec(cell: Cell, lr: float, pair: tuple[int, int], tune: bool) -> RunSpec:
    subsample, seed = pair
    train = {**cell.train, "lr": lr, "seed": seed, "subsample_seed": subsample}
    labels = {**cell.labels, "lr": lr, "seed": seed}
    if cell.resample:
        labels["subsample"] = subsample
    return RunSpec(run_name(cell, lr, pair), labels, train, dict(cell.prefix), cell.test_split,
                   dict(cell.evaluation), cell.name, tune)  # fmt: skip


def tuning_runs(cells: list[Cell], scale: dict[str, Any],
                tuned: dict[str, dict[str, Any]] | None = None) -> list[RunSpec]:  # fmt: skip
    """One dev-scored run per cell and LR value of its grid as far as `tuned` (the finished
    tuning rows by run name) extends it, with the cell's first seed pair."""
    tuned = tuned or {}
    return [_spec(c, lr, pairs_of(c, scale)[0], True)
            for c in cells for lr in cell_grid(c, tuned, scale)]  # fmt: skip


def cell_grid(cell: Cell, tuned: dict[str, dict[str, Any]], scale: dict[str, Any],
              ) -> tuple[float, ...]:  # fmt: skip
    """The method's grid, plus one value past an edge for each time a finished grid had its
    best finite dev score at that edge (at most scale["lr_extend"] values)."""
    grid = list(lr_grid(cell.method, scale))
    for _ in range(scale.get("lr_extend", 0) if len(grid) > 1 else 0):
        raw = _raw_scores(cell, grid, tuned, scale)
        done = all(v is not UNFINISHED for v in raw.values())
        scores = _finite(raw, scale["select"]) if done else {}
        if not scores:
            break  # unfinished, or nothing finite to follow
        best = _best(scores)
        if best == grid[0]:
            grid.insert(0, _round(grid[0] * grid[0] / grid[1]))
        elif best == grid[-1]:
            grid.append(_round(grid[-1] * grid[-1] / grid[-2]))
        else:
            break
    return tuple(grid)


def _round(lr: float) -> float:
    return float(f"{lr:.2g}")  # 2e-4 * 2e-4 / 5e-4 -> 8e-05, not 8.000000000000001e-05


def _raw_scores(cell: Cell, grid: list[float] | tuple[float, ...], tuned: dict[str, dict[str, Any]],
                scale: dict[str, Any]) -> dict[float, Any]:  # fmt: skip
    """Each LR's dev score as its row has it (UNFINISHED for a run without a row)."""
    pair = pairs_of(cell, scale)[0]
    rows = {lr: tuned.get(run_name(cell, lr, pair)) for lr in grid}
    return {lr: UNFINISHED if row is None else row.get(scale["select"])
            for lr, row in rows.items()}  # fmt: skip


def _finite(raw: dict[float, Any], select: str) -> dict[float, float]:
    """The finite scores, signed so that lower is better."""
    return {lr: v if select == "dev_loss" else -v for lr, v in raw.items()
            if isinstance(v, int | float) and math.isfinite(v)}  # fmt: skip


def _best(scores: dict[float, float]) -> float:
    return min(scores, key=lambda lr: (scores[lr], lr))


def choose_lr(cell: Cell, tuned: dict[str, dict[str, Any]], scale: dict[str, Any]) -> float:
    """The cell's LR with the best dev score among its tuning rows (by run name), over its grid
    as extended; refused when no tuning run has a finite score (all diverged or reported none)."""
    select = scale["select"]
    raw = _raw_scores(cell, cell_grid(cell, tuned, scale), tuned, scale)
    for lr, value in raw.items():
        if value is UNFINISHED:
            raise TuningUnfinished(
                f"cell {cell.name}: the tuning run at lr {lr:g} has not finished"
            )
    scores = _finite(raw, select)
    if not scores:
        found = ", ".join(f"lr {lr:g}: {v}" for lr, v in raw.items())
        raise ConfigError(f"cell {cell.name}: no tuning run has a finite {select} ({found}); "
                          "every learning rate diverged or was not scored: check the cell's "
                          "LR grid and data")  # fmt: skip
    return _best(scores)


def seed_runs(cells: list[Cell], tuned: dict[str, dict[str, Any]], scale: dict[str, Any],
              ) -> list[RunSpec]:  # fmt: skip
    """Every seed pair of every cell at its chosen LR (cells whose tuning is unfinished: none)."""
    runs = []
    for cell in cells:
        try:
            lr = choose_lr(cell, tuned, scale)
        except TuningUnfinished:
            continue
        record = tuning_record(cell, tuned, scale)
        for pair in pairs_of(cell, scale):
            spec = _spec(cell, lr, pair, False)
            spec.tuning = record
            runs.append(spec)
    return runs


def tuning_record(cell: Cell, tuned: dict[str, dict[str, Any]], scale: dict[str, Any],
                  ) -> dict[str, Any]:  # fmt: skip
    """What a seed run records of its cell's tuning: the grid, every value's dev scores, the pick,
    the values added past an edge, and whether the pick is still at an edge."""
    pair = pairs_of(cell, scale)[0]
    values = cell_grid(cell, tuned, scale)
    grid = {f"{lr:g}": {k: tuned[run_name(cell, lr, pair)].get(k) for k in ("dev_loss", "dev_bleu")}
            for lr in values}  # fmt: skip
    lr = choose_lr(cell, tuned, scale)
    base = lr_grid(cell.method, scale)
    return {"lr_grid": grid, "selected_by": scale["select"], "lr": lr,
            "extended": [f"{v:g}" for v in values if v not in base],
            "at_edge": len(values) > 1 and lr in (values[0], values[-1])}  # fmt: skip
