"""The paper's tables and figures as grids of cells: `prefixtune reproduce <experiment>`.

A cell is one configuration (a method at a size, a prefix length, an initialisation) whose
learning rate is tuned on dev and which then trains once per (subsample seed, training seed)
pair of the scale (tuning.py expands cells into runs). Scales and LR grids: scales.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.experiments.scales import SCALES, scale_name


@dataclass
class RunSpec:
    """One training run: a cell at one learning rate and one seed pair."""

    name: str
    labels: dict[str, Any]
    train: dict[str, Any]
    prefix: dict[str, Any] = field(default_factory=dict)
    test_split: str = "test"
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Overrides of the scale's test/new_tokens/beams/length_penalty for this run's scoring."""
    cell: str = ""
    tune: bool = False
    """A tuning run: scored on dev only (its seed-0 twin at the chosen LR is the same training)."""
    tuning: dict[str, Any] = field(default_factory=dict)
    """A seed run's record of its cell's tuning (tuning.tuning_record)."""


@dataclass
class Cell:
    """One configuration of an experiment; its runs differ in learning rate and seeds only."""

    name: str
    labels: dict[str, Any]
    train: dict[str, Any]
    prefix: dict[str, Any] = field(default_factory=dict)
    test_split: str = "test"
    evaluation: dict[str, Any] = field(default_factory=dict)
    resample: bool = False
    """A new training subsample per seed pair (low-data) instead of one fixed subsample."""
    seeds: int = 0
    """Seed pairs for this cell (0: the scale's)."""

    @property
    def method(self) -> str:
        return self.train.get("method", "prefix")


def _base(scale: dict[str, Any], data: str) -> dict[str, Any]:
    steps = {"max_steps": scale["steps"]} if scale["steps"] else {"epochs": 10}
    return {"data": data, "batch_size": scale["batch"], "dev_size": scale["dev"],
            "max_source_tokens": scale["source_tokens"], "max_target_tokens": scale["target_tokens"],
            "patience": scale["patience"], **steps}  # fmt: skip


WORDS = {"init": "words", "init_text": "table-to-text:"}


def lowdata_grid(scale: dict[str, Any]) -> list[Cell]:
    """Figure 3: prefix vs fine-tune at 50-500 training examples, several subsamples and seeds.

    Early stopping on dev (the scale's patience) picks the number of epochs."""
    return [Cell(f"{method}-n{size}", {"method": method, "size": size},
                 {**_base(scale, "e2e"), "train_size": size, "method": method},
                 WORDS if method == "prefix" else {}, resample=True)
            for size in scale["sizes"] for method in ("prefix", "finetune")]  # fmt: skip


def length_grid(scale: dict[str, Any]) -> list[Cell]:
    """Figure 4: prefix length on E2E (all lengths start from the same real words)."""
    lengths = (1, 5) if scale is SCALES["tiny"] else (1, 5, 10, 20, 40)
    base = {**_base(scale, "e2e"), "train_size": scale["train_size"]}
    return [Cell(f"len{n}", {"length": n}, base, {"length": n, **WORDS}, seeds=1)
            for n in lengths]  # fmt: skip


INIT_WORDS = ("table-to-text:", "summarize", "elephant", "banana", "active")


def init_grid(scale: dict[str, Any]) -> list[Cell]:
    """Figure 5: random vs real-word initialisation at the smallest low-data size, with the
    low-data protocol (LR tuned per init, several subsample/seed pairs)."""
    base = {**_base(scale, "e2e"), "train_size": scale["sizes"][0]}
    cells = [Cell("random", {"init": "random"}, base, {}, resample=True)]
    for words in INIT_WORDS[: 2 if scale is SCALES["tiny"] else None]:
        slug = "".join(c for c in words if c.isalnum())
        cells.append(Cell(slug, {"init": words}, base, {"init": "words", "init_text": words},
                          resample=True))  # fmt: skip
    return cells


TABLE1_METHODS = (
    ("prefix", {}, WORDS),
    ("finetune", {}, {}),
    ("ft-top2", {}, {}),
    ("adapter", {"adapter_share": 0.03}, {}),
    ("adapter", {"adapter_share": 0.001}, {}),
    ("embedding", {}, WORDS),
    ("infix", {}, WORDS),
)


def table1_grid(scale: dict[str, Any], data: str = "e2e") -> list[Cell]:
    """Table 1: every method on one fixed training subsample (the scale's train_size)."""
    cells = []
    for method, train, prefix in TABLE1_METHODS:
        share = train.get("adapter_share")
        label = f"{method} ({share:.1%})" if share else method
        name = f"{method}-{share}" if share else method
        spec = {**_base(scale, data), "train_size": scale["train_size"], "method": method, **train}
        cells.append(Cell(name, {"method": label}, spec, prefix))
    return cells


# Summaries: long prompts ("<article>\nTL;DR: <summary>"), so fewer, smaller steps than E2E.
XSUM_SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 2, "source_tokens": 64, "target_tokens": 16, "length": 4},
    "cpu": {"steps": 60, "batch": 4, "test": 50, "dev": 30, "source_tokens": 320,
            "target_tokens": 48, "new_tokens": 48, "length": 100, "beams": 1},
    "small": {"steps": 60, "batch": 4, "test": 50, "dev": 30, "source_tokens": 320,
              "target_tokens": 48, "new_tokens": 48, "length": 100},
    "full": {"batch": 8, "source_tokens": 512, "target_tokens": 64, "new_tokens": 60,
             "beams": 6, "length_penalty": 0.8, "length": 200},  # the paper's decoding
}  # fmt: skip
XSUM_SEPARATOR = "\nTL;DR: "


def xsum_grid(scale: dict[str, Any], sports: bool = False) -> list[Cell]:
    """Tables 2-3: prefix vs fine-tune on XSum as "article TL;DR: summary" (decoder-only).

    sports=False: our 800/100/100 split of the available docs; sports=True: train on news,
    test on sport (news-train / news-dev / sports-test, see datasets._read_xsum).
    """
    xsum = {**scale, **XSUM_SCALES[scale_name(scale)]}
    cells = []
    for method in ("prefix", "finetune"):
        train = {**_base(xsum, "xsum"), "method": method, "separator": XSUM_SEPARATOR}
        if sports:
            train.update(train_split="news-train", dev_split="news-dev")
        prefix = {"length": xsum["length"], "init": "words", "init_text": "summarize"}
        cells.append(Cell(method, {"method": method}, train,
                          prefix if method == "prefix" else {},
                          "sports-test" if sports else "test",
                          {k: xsum[k] for k in ("test", "new_tokens", "beams", "length_penalty")
                           if k in xsum}, seeds=1))  # fmt: skip
    return cells


GRIDS: dict[str, Callable[[dict[str, Any]], list[Cell]]] = {
    "lowdata": lowdata_grid,
    "length": length_grid,
    "init": init_grid,
    "table1": table1_grid,
    "table1-webnlg": lambda scale: table1_grid(scale, "webnlg"),
    "table1-dart": lambda scale: table1_grid(scale, "dart"),
    "xsum": xsum_grid,
    "xsum-sports": lambda scale: xsum_grid(scale, sports=True),
}


def check_experiment(name: str, scale: str) -> None:
    if name not in GRIDS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {sorted(GRIDS)}")
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {sorted(SCALES)}, got {scale!r}")
