"""Learning rates chosen on dev, never test: cells expanded into tuning runs and seed runs.

Each cell trains once per value of its method's LR grid with the first seed pair; the dev loss
(or dev BLEU, the scale's `select`) picks the value; every seed pair then trains at it. The
first pair's run at the chosen value IS the tuning run (same name, same training), so it is only
scored on test, not trained again.
"""

from __future__ import annotations

import math
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.experiments.grid import Cell, RunSpec
from prefixtune.experiments.scales import lr_grid, seed_pairs


class TuningUnfinished(ConfigError):
    """A cell's tuning run has not finished yet: its seed runs wait (other cells go on)."""


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


def tuning_runs(cells: list[Cell], scale: dict[str, Any]) -> list[RunSpec]:
    """One dev-scored run per cell and LR value, with the cell's first seed pair."""
    return [
        _spec(c, lr, pairs_of(c, scale)[0], True) for c in cells for lr in lr_grid(c.method, scale)
    ]


def choose_lr(cell: Cell, tuned: dict[str, dict[str, Any]], scale: dict[str, Any]) -> float:
    """The cell's LR with the best dev score among its tuning rows (by run name); refused when
    no tuning run has a finite score (every one diverged or reported none)."""
    select = scale["select"]
    raw = {}
    for lr in lr_grid(cell.method, scale):
        row = tuned.get(run_name(cell, lr, pairs_of(cell, scale)[0]))
        if row is None:
            raise TuningUnfinished(
                f"cell {cell.name}: the tuning run at lr {lr:g} has not finished"
            )
        raw[lr] = row.get(select)
    scores = {lr: v if select == "dev_loss" else -v for lr, v in raw.items()
              if isinstance(v, int | float) and math.isfinite(v)}  # fmt: skip
    if not scores:
        found = ", ".join(f"lr {lr:g}: {v}" for lr, v in raw.items())
        raise ConfigError(f"cell {cell.name}: no tuning run has a finite {select} ({found}); "
                          "every learning rate diverged or was not scored: check the cell's "
                          "LR grid and data")  # fmt: skip
    return min(scores, key=lambda lr: (scores[lr], lr))


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
    """What a seed run records of its cell's tuning: the grid, every value's dev scores, the pick."""
    pair = pairs_of(cell, scale)[0]
    grid = {f"{lr:g}": {k: tuned[run_name(cell, lr, pair)].get(k) for k in ("dev_loss", "dev_bleu")}
            for lr in lr_grid(cell.method, scale)}  # fmt: skip
    return {"lr_grid": grid, "selected_by": scale["select"], "lr": choose_lr(cell, tuned, scale)}
