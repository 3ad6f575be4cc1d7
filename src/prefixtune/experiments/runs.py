"""One run of an experiment: train (or resume), score, and write its committed result file.

Training lives under the runs folder (checkpoints, artifacts; never committed). What a run
found is written, atomically, under the results folder, meant to be committed:
    tune/<run>.json                   a tuning run's dev scores
    runs/<run>.json                   a seed run's test metrics, tuning record, machine, versions
    runs/<run>.predictions.json       its test predictions (the paired bootstrap reads them)
A result file present means done: the run is skipped (on any machine that has the file).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixtune.config import ConfigError, GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.atomic_files import atomic_write_json
from prefixtune.experiments.grid import RunSpec
from prefixtune.experiments.scales import SCALES


@dataclass(frozen=True)
class Context:
    """Where an experiment's runs train and where their results go (picklable for workers)."""

    root: Path
    out: Path
    scale: str
    model: str = ""


def result_path(spec: RunSpec, ctx: Context) -> Path:
    return ctx.out / ("tune" if spec.tune else "runs") / f"{spec.name}.json"


def finished(spec: RunSpec, ctx: Context) -> dict[str, Any] | None:
    """The run's result row if its result file exists (checked to be of this scale and model)."""
    path = result_path(spec, ctx)
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    if (row.get("scale"), row.get("model")) != (ctx.scale, ctx.model):
        raise ConfigError(f"{path} is a {row.get('scale')} scale run of model "
                          f"{row.get('model') or 'default'!r}: pass another --results folder")  # fmt: skip
    return row


def test_items(data: str, split: str, limit: int) -> list:
    """The scored items of a split, exactly as evaluate_run picks them (grouped, seeded subset)."""
    from prefixtune.data.readers import load_examples, subsample

    examples = load_examples(data, split, grouped=True)
    return subsample(examples, limit, seed=0) if limit and limit < len(examples) else examples


def sources_digest(examples: list) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.source.encode() + b"\x00")
    return digest.hexdigest()[:16]


def machine() -> str:
    """The CPU model (and the GPU, if one is used) of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    if torch.cuda.is_available():
        cpu += f"; {torch.cuda.get_device_name(0)}"
    return cpu


def _train(spec: RunSpec, ctx: Context) -> dict[str, Any]:
    """Train the run (resuming a checkpoint), or read the summary of a finished training."""
    from prefixtune.evaluation.predictor import read_run
    from prefixtune.training.trainer import train

    run_dir = ctx.root / spec.name
    if (run_dir / "run.json").exists() and (run_dir / "prefix").exists():
        return read_run(run_dir)
    config = TrainConfig(**{**spec.train, "model": ctx.model, "out": str(run_dir), "resume": True,
                            "progress": False})  # fmt: skip
    return train(config, PrefixConfig(**spec.prefix))


def _dev_bleu(spec: RunSpec, ctx: Context, items: int) -> float | None:
    from prefixtune.evaluation.predictor import evaluate_run

    run_dir = ctx.root / spec.name
    split = spec.train.get("dev_split", "dev")
    report = evaluate_run(
        run_dir,
        split,
        config=GenerateConfig(max_new_tokens=SCALES[ctx.scale]["new_tokens"]),
        limit=items,
        bootstrap=0,
        progress=False,
        out=run_dir / "eval-dev-greedy",
    )
    metrics = report["metrics"]
    return metrics.get("BLEU", metrics.get("ROUGE_L"))


def run_one(spec: RunSpec, ctx: Context) -> dict[str, Any]:
    """Train and score one run unless its result file exists; returns its result row."""
    done = finished(spec, ctx)
    if done is not None:
        return done
    began = time.perf_counter()
    scale = SCALES[ctx.scale]
    summary = _train(spec, ctx)
    row = {**spec.labels, "run": spec.name, "cell": spec.cell, "scale": ctx.scale,
           "model": ctx.model, "dev_loss": _finite(summary.get("best_dev_loss")),
           "stopped_early_at": summary.get("stopped_early_at"), "steps": summary.get("steps"),
           "trainable": summary["trainable_parameters"],
           "trainable_share": summary["trainable_share"], "train_seconds": summary["seconds"],
           "dtype": summary.get("autocast"), "device": summary.get("device"),
           "versions": summary.get("versions"), "machine": machine()}  # fmt: skip
    if spec.tune:
        if scale["dev_bleu"]:
            row["dev_bleu"] = _dev_bleu(spec, ctx, scale["dev_bleu"])
    else:
        row.update(_score_test(spec, ctx, scale))
        row["tuning"] = spec.tuning
    row["wall_seconds"] = time.perf_counter() - began  # this sitting: training + scoring
    atomic_write_json(result_path(spec, ctx), row)
    return row


def _score_test(spec: RunSpec, ctx: Context, scale: dict[str, Any]) -> dict[str, Any]:
    """Decode every scored test item (the scale's beams), write predictions; metrics + shares."""
    from prefixtune.evaluation.predictor import evaluate_run

    scoring = {**scale, **spec.evaluation}
    generation = GenerateConfig(max_new_tokens=scoring["new_tokens"], num_beams=scoring["beams"],
                                length_penalty=scoring.get("length_penalty", 1.0))  # fmt: skip
    run_dir = ctx.root / spec.name
    report = evaluate_run(run_dir, spec.test_split, config=generation, limit=scoring["test"],
                          bootstrap=0, progress=False)  # fmt: skip
    predictions = (run_dir / f"eval-{spec.test_split}" / "predictions.txt").read_text()
    items = test_items(spec.train["data"], spec.test_split, scoring["test"])
    lines = predictions.split("\n")[: len(items)]
    atomic_write_json(ctx.out / "runs" / f"{spec.name}.predictions.json",
                      {"split": spec.test_split, "items": len(items),
                       "sources_sha": sources_digest(items), "predictions": lines})  # fmt: skip
    return {"metrics": report["metrics"], "test_items": len(items), "test_split": spec.test_split,
            "generation": report["generation"], "stored_share": stored_share(run_dir)}  # fmt: skip


def stored_share(run_dir: Path) -> float:
    """What the saved artifact keeps per task, as a share of the base model (the paper's
    "% params": a prefix is its folded keys/values)."""
    from safetensors import safe_open

    from prefixtune.evaluation.predictor import read_run

    summary = read_run(run_dir)
    base = summary["trainable_parameters"] / summary["trainable_share"]
    total = 0
    for path in sorted((run_dir / "prefix").glob("*.safetensors")):
        with safe_open(str(path), "pt") as tensors:
            total += sum(math.prod(tensors.get_slice(k).get_shape()) for k in tensors.keys())  # noqa: SIM118
    return total / base


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) or math.isnan(value) else value
