"""`prefixtune bench --suite quantize`: the int8 weight-only frozen base (core/quantize.py)
against the fp32 base, side by side in one run: a prefix training step (tokens/s, peak memory),
greedy decoding with a prefix (one row, and a batch of rows), and the quality cost: a short
E2E prefix-tuning run on each base, its dev loss and greedy BLEU on the first test inputs.
Every configuration runs in its own worker process (runner.py), computing in fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from prefixtune.bench.common import (
    build_model,
    build_ours,
    measure,
    prompt_rows,
    rates,
    synthetic_batch,
)

MODES = ("none", "int8")

FULL = {
    "train": {"batch": 4, "seq": 64, "prefix_len": 10},
    "decode": {"new_tokens": 32, "prefix_len": 10, "prompt_min": 16, "prompt_max": 48,
               "rows": (1, 8)},
    "e2e": {"train_size": 500, "max_steps": 20, "batch": 5, "lr": 1e-3, "dev_size": 30,
            "eval_items": 20, "new_tokens": 32, "prefix_len": 10},  # minutes on one thread
}  # fmt: skip
QUICK = {
    "train": {"batch": 2, "seq": 16, "prefix_len": 4},
    "decode": {"new_tokens": 8, "prefix_len": 4, "prompt_min": 4, "prompt_max": 12,
               "rows": (1, 4)},
}  # fmt: skip


def quantize_specs(models: list[str], quick: bool, base: dict[str, Any]) -> dict[str, dict]:
    """Every configuration of the suite: each measurement on the fp32 base ('none') and int8.
    The E2E runs need the real data and the embedded model: full size only."""
    shapes = QUICK if quick else FULL
    specs: dict[str, dict] = {}
    for model in models:
        for mode in MODES:
            tag = f"quantize/{model}/{'fp32' if mode == 'none' else mode}"
            specs[f"{tag}/train"] = {**base, "kind": "quantize_train", "model": model,
                                     "quantize": mode, **shapes["train"]}  # fmt: skip
            decode = shapes["decode"]
            for rows in decode["rows"]:
                specs[f"{tag}/decode-{rows}-row{'s' if rows > 1 else ''}"] = {
                    **base, "kind": "quantize_decode", "model": model, "quantize": mode,
                    **decode, "rows": rows}  # fmt: skip
    if not quick:
        for mode in MODES:
            name = f"quantize/e2e/{'fp32' if mode == 'none' else mode}"
            specs[name] = {"kind": "quantize_e2e", "quantize": mode, "seed": 0, **FULL["e2e"]}
    return specs


def _base(spec: dict[str, Any]):
    """The bench model, quantized as the spec asks; (model, weight bytes)."""
    from prefixtune.core.quantize import quantize_model, weight_bytes

    model, _ = build_model(spec["model"], seed=spec.get("seed", 0))
    quantize_model(model, spec["quantize"])
    _give_back_freed_memory()
    return model, weight_bytes(model)


def _give_back_freed_memory() -> None:
    """Return the replaced fp32 weights' pages to the OS (glibc), so the resident memory before
    the steps is the quantized model's."""
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    """One prefix-tuning step (forward, backward through the frozen base, AdamW), fp32."""
    model, weights = _base(spec)
    batch = synthetic_batch(model.config.vocab_size, spec["batch"], spec["seq"], seed=0)
    method = build_ours(model, spec["prefix_len"], True, spec["mlp_hidden"], spec.get("seed", 0))
    optimizer = torch.optim.AdamW(method.parameters(), lr=5e-5)
    last: dict[str, float] = {}

    def step() -> None:
        loss = method.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last["loss"] = float(loss.detach())

    result = measure(step, spec["iters"], spec["warmup"])
    tokens = int(batch["attention_mask"].sum())
    return {**result, **rates(result, tokens), "tokens_per_step": tokens,
            "weight_mb": round(weights / 2**20, 1), "loss": last.get("loss")}  # fmt: skip


def run_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of `rows` prompts with one random prefix, exactly new_tokens each."""
    from prefixtune.bench.generate import NEVER, _ours, random_prefix

    model, weights = _base(spec)
    model.config.use_cache = True
    prefix = random_prefix(model, spec["prefix_len"], 1000).to_prefix_kv()
    rows = prompt_rows(model.config.vocab_size, spec["rows"], spec["prompt_min"],
                       spec["prompt_max"])  # fmt: skip
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out: dict[str, list] = {}

    def step() -> None:
        out["ids"] = _ours(model, rows, prefix, spec["new_tokens"], pad)

    result = measure(step, spec["iters"], spec["warmup"])
    generated = sum(len(r) for r in out["ids"])  # EOS is NEVER: rows x new_tokens
    return {**result, **rates(result, generated, "new_tokens_per_s"), "eos_id": NEVER,
            "weight_mb": round(weights / 2**20, 1), "first_row": out["ids"][0]}  # fmt: skip


def run_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """`prefixtune train --data e2e --train-size N --max-steps S --quantize Q --autocast
    float32`, then `prefixtune evaluate --split test --limit M --preset greedy --quantize Q`."""
    from prefixtune.config import GenerateConfig, PrefixConfig, TrainConfig
    from prefixtune.evaluation.predictor import evaluate_run
    from prefixtune.training.trainer import train

    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as out:
        config = TrainConfig(data="e2e", out=out, train_size=spec["train_size"],
                             max_steps=spec["max_steps"], batch_size=spec["batch"],
                             lr=spec["lr"], dev_size=spec["dev_size"], eval_every=spec["max_steps"],
                             autocast="float32", quantize=spec["quantize"], progress=False,
                             seed=spec["seed"])  # fmt: skip
        summary = train(config, PrefixConfig(length=spec["prefix_len"]))
        generation = GenerateConfig.preset("greedy", max_new_tokens=spec["new_tokens"])
        report = evaluate_run(out, "test", config=generation, limit=spec["eval_items"],
                              bootstrap=0, progress=False, quantize=spec["quantize"])  # fmt: skip
        first = (Path(out) / "eval-test" / "predictions.txt").read_text().splitlines()[:3]
    keys = ("initial_dev_loss", "final_dev_loss", "best_dev_loss", "tokens_per_second", "seconds")
    return {**{k: summary.get(k) for k in keys}, "metrics": report["metrics"],
            "items": report["items"], "first_predictions": first}  # fmt: skip


RUNNERS = {"quantize_train": run_train, "quantize_decode": run_decode, "quantize_e2e": run_e2e}


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker of one quantize-suite configuration."""
    return RUNNERS[spec["kind"]](spec)
