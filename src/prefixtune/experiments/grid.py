"""The paper's tables and figures at any scale: `prefixtune reproduce <experiment>`.

An experiment is a grid of runs. Each run trains (prefixtune.training.trainer) and then scores a fixed
test subset (prefixtune.evaluation.predictor); its result.json marks it done, so an interrupted experiment
resumes without redoing finished runs (an interrupted run resumes from its checkpoint).
Results go to docs/results/<experiment>/ as results.csv, results.md and a PNG plot.

Scales: tiny (a smoke test: a few steps and items; CI runs it on a tiny random model),
small (this 2-core CPU, about an hour per experiment), full (a GPU; the paper's settings).
Model selection never looks at the test split: the prefix kept is the best by dev loss. At small
scale a run stops once 3 dev evaluations in a row (one per epoch) brought no improvement: the
low-data runs (50-500 examples, 150 steps) overfit within a few epochs and rarely recover, so
this saves most of their time (runs with 2,000 examples see one epoch at most: no change).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixtune.config import ConfigError, GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.atomic_files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 3, "test": 4, "dev": 4, "seeds": 1, "sizes": (8, 16), "batch": 2,
             "new_tokens": 8, "beams": 1, "source_tokens": 40, "target_tokens": 16, "patience": 0},
    "small": {"steps": 150, "test": 100, "dev": 100, "seeds": 2, "sizes": (50, 100, 200, 500),
              "batch": 8, "new_tokens": 64, "beams": 1, "source_tokens": 128, "target_tokens": 64,
              "patience": 3},
    "full": {"steps": 0, "test": 0, "dev": 500, "seeds": 5, "sizes": (50, 100, 200, 500),
             "batch": 5, "new_tokens": 100, "beams": 5, "source_tokens": 256, "target_tokens": 128,
             "patience": 0},
}  # fmt: skip


@dataclass
class RunSpec:
    """One cell of an experiment grid."""

    name: str
    labels: dict[str, Any]
    train: dict[str, Any]
    prefix: dict[str, Any] = field(default_factory=dict)
    test_split: str = "test"
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Overrides of the scale's test/new_tokens/beams/length_penalty for this run's scoring."""


def _base(scale: dict[str, Any], data: str, seed: int) -> dict[str, Any]:
    steps = {"max_steps": scale["steps"]} if scale["steps"] else {"epochs": 10}
    return {"data": data, "seed": seed, "batch_size": scale["batch"], "dev_size": scale["dev"],
            "lr": 5e-5 if not scale["steps"] else 5e-4,
            "max_source_tokens": scale["source_tokens"], "max_target_tokens": scale["target_tokens"],
            "patience": scale["patience"], **steps}  # fmt: skip


def lowdata_grid(scale: dict[str, Any]) -> list[RunSpec]:
    """Figure 3: prefix vs fine-tune at 50-500 training examples, several seeds."""
    runs = []
    for size in scale["sizes"]:
        for seed in range(scale["seeds"]):
            for method in ("prefix", "finetune"):
                train = {**_base(scale, "e2e", seed), "train_size": size, "method": method}
                if method == "finetune":
                    train["lr"] = 5e-5
                runs.append(RunSpec(f"{method}-n{size}-s{seed}",
                                    {"method": method, "size": size, "seed": seed}, train,
                                    {"init": "words", "init_text": "table-to-text:"}))  # fmt: skip
    return runs


def length_grid(scale: dict[str, Any]) -> list[RunSpec]:
    """Figure 4: prefix length on E2E (all lengths start from the same real words)."""
    lengths = (1, 5) if scale is SCALES["tiny"] else (1, 5, 10, 20, 40)
    words = {"init": "words", "init_text": "table-to-text:"}  # cycled/cut to each length
    return [RunSpec(f"len{n}", {"length": n}, {**_base(scale, "e2e", 0), "train_size": 2000},
                    {"length": n, **words}) for n in lengths]  # fmt: skip


INIT_WORDS = ("table-to-text:", "summarize", "elephant", "banana", "active")


def init_grid(scale: dict[str, Any]) -> list[RunSpec]:
    """Figure 5: random vs real-word initialisation in a low-data setting, across seeds."""
    runs = []
    for seed in range(max(scale["seeds"], 2)):
        base = {**_base(scale, "e2e", seed), "train_size": scale["sizes"][0]}
        runs.append(RunSpec(f"random-s{seed}", {"init": "random", "seed": seed}, base, {}))
        for words in INIT_WORDS[: 2 if scale is SCALES["tiny"] else None]:
            slug = "".join(c for c in words if c.isalnum())
            runs.append(RunSpec(f"{slug}-s{seed}", {"init": words, "seed": seed}, base,
                                {"init": "words", "init_text": words}))  # fmt: skip
    return runs


TABLE1_METHODS = (
    ("prefix", {}, {"init": "words", "init_text": "table-to-text:"}),
    ("finetune", {"lr": 5e-5}, {}),
    ("ft-top2", {"lr": 5e-5}, {}),
    ("adapter", {"adapter_share": 0.03}, {}),
    ("adapter", {"adapter_share": 0.001}, {}),
    ("embedding", {}, {"init": "words", "init_text": "table-to-text:"}),
    ("infix", {}, {"init": "words", "init_text": "table-to-text:"}),
)


def table1_grid(scale: dict[str, Any], data: str = "e2e") -> list[RunSpec]:
    """Table 1: every method at one common budget."""
    runs = []
    for method, train, prefix in TABLE1_METHODS:
        share = train.get("adapter_share")
        label = f"{method} ({share:.1%})" if share else method
        name = f"{method}-{share}" if share else method
        spec = {**_base(scale, data, 0), "train_size": 2000, "method": method, **train}
        runs.append(RunSpec(name, {"method": label}, spec, prefix))
    return runs


# Summaries: long prompts ("<article>\nTL;DR: <summary>"), so fewer, smaller steps than E2E.
XSUM_SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 2, "source_tokens": 64, "target_tokens": 16, "length": 4},
    "small": {"steps": 60, "batch": 4, "test": 50, "dev": 30, "source_tokens": 320,
              "target_tokens": 48, "new_tokens": 48, "length": 100},
    "full": {"batch": 8, "source_tokens": 512, "target_tokens": 64, "new_tokens": 60,
             "beams": 6, "length_penalty": 0.8, "length": 200},  # the paper's decoding
}  # fmt: skip
XSUM_SEPARATOR = "\nTL;DR: "


def xsum_grid(scale: dict[str, Any], sports: bool = False) -> list[RunSpec]:
    """Tables 2-3: prefix vs fine-tune on XSum as "article TL;DR: summary" (decoder-only).

    sports=False: our 800/100/100 split of the available docs; sports=True: train on news,
    test on sport (news-train / news-dev / sports-test, see datasets._read_xsum).
    """
    xsum = {**scale, **XSUM_SCALES[_scale_name(scale)]}
    runs = []
    for method in ("prefix", "finetune"):
        train = {**_base(xsum, "xsum", 0), "method": method, "separator": XSUM_SEPARATOR}
        if sports:
            train.update(train_split="news-train", dev_split="news-dev")
        if method == "finetune":
            train["lr"] = 5e-5
        prefix = {"length": xsum["length"], "init": "words", "init_text": "summarize"}
        runs.append(RunSpec(method, {"method": method}, train, prefix if method == "prefix" else {},
                            "sports-test" if sports else "test",
                            {k: xsum[k] for k in ("test", "new_tokens", "beams", "length_penalty")
                             if k in xsum}))  # fmt: skip
    return runs


def _scale_name(scale: dict[str, Any]) -> str:
    return next(name for name, known in SCALES.items() if known is scale)


GRIDS: dict[str, Callable[[dict[str, Any]], list[RunSpec]]] = {
    "lowdata": lowdata_grid,
    "length": length_grid,
    "init": init_grid,
    "table1": table1_grid,
    "table1-webnlg": lambda scale: table1_grid(scale, "webnlg"),
    "xsum": xsum_grid,
    "xsum-sports": lambda scale: xsum_grid(scale, sports=True),
}


def run_one(spec: RunSpec, root: Path, scale: dict[str, Any], model: str) -> dict[str, Any]:
    """Train and score one run, unless its result.json exists; returns the result row."""
    from prefixtune.evaluation.predictor import evaluate_run
    from prefixtune.training.trainer import train

    run_dir = root / spec.name
    finished = finished_row(spec, root)
    if finished is not None:
        return finished
    config = TrainConfig(**{**spec.train, "model": model, "out": str(run_dir), "resume": True,
                            "progress": False})  # fmt: skip
    summary = train(config, PrefixConfig(**spec.prefix))
    scoring = {**scale, **spec.evaluation}
    generation = GenerateConfig(max_new_tokens=scoring["new_tokens"], num_beams=scoring["beams"],
                                length_penalty=scoring.get("length_penalty", 1.0))  # fmt: skip
    report = evaluate_run(run_dir, spec.test_split, config=generation,
                          limit=scoring["test"], bootstrap=0, progress=False)  # fmt: skip
    row = {**spec.labels, "run": spec.name, **report["metrics"],
           "dev_loss": summary["best_dev_loss"], "trainable": summary["trainable_parameters"],
           "seconds": summary["seconds"]}  # fmt: skip
    row = with_shares(row, run_dir)
    atomic_write_json(run_dir / "result.json", row)
    return row


def finished_row(spec: RunSpec, root: Path) -> dict[str, Any] | None:
    """The result row of a finished run (its result.json), or None."""
    run_dir = root / spec.name
    done = run_dir / "result.json"
    return with_shares(json.loads(done.read_text()), run_dir) if done.exists() else None


def with_shares(row: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Add the trained and the stored share of the base model's parameters to a result row.

    trainable_share: what the optimizer updates (a prefix's MLP reparameterisation included);
    stored_share: what the saved artifact keeps per task (the paper's "% params": a prefix is its
    folded keys/values). Rows of runs finished before these were recorded get them too.
    """
    from prefixtune.evaluation.predictor import read_run

    summary = read_run(run_dir)
    base = summary["trainable_parameters"] / summary["trainable_share"]
    stored = stored_parameters(run_dir / "prefix")
    return {**row, "trainable_share": summary["trainable_share"], "stored_share": stored / base}


def stored_parameters(directory: Path) -> int:
    """Number of values in the safetensors files of an artifact directory."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as tensors:
            total += sum(math.prod(tensors.get_slice(k).get_shape()) for k in tensors.keys())  # noqa: SIM118 (no __iter__)
    return total


def summarise(rows: list[dict[str, Any]], group_by: str, metrics=("BLEU", "ROUGE_L")) -> list[dict]:
    """Mean and standard deviation of each metric per value of `group_by` (across seeds)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[group_by], []).append(row)
    table = []
    for key, members in groups.items():
        entry: dict[str, Any] = {group_by: key, "runs": len(members)}
        for metric in metrics:
            values = [m[metric] for m in members if metric in m]
            if values:
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    """results.csv with every run's row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=sorted({k for row in rows for k in row}))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())


def markdown_table(table: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join(
        "| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |\n" for r in table
    )


def check_experiment(name: str, scale: str) -> None:
    if name not in GRIDS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {sorted(GRIDS)}")
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {sorted(SCALES)}, got {scale!r}")
