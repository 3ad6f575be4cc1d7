"""Paired bootstrap test of the corpus-BLEU difference between two systems (Koehn 2004).

Pure functions: predictions and references in, numbers out. A "system" is one or more runs (e.g.
seeds or subsamples) that decoded the same test items in the same order; its score on a resample
is the mean over its runs of the corpus BLEU on that resample, so seed-to-seed spread and the
choice of test items are both in the test. Each resample draws the test items with replacement
once and scores both systems on that same draw (paired). BLEU is the task's BLEU of
prefixtune.evaluation.metrics (E2E: mteval-normalised; WebNLG/DART: 13a lowercased; generic: 13a).

p-value: two-sided, 2 x the smaller share of resamples whose difference is <= 0 or >= 0 (capped
at 1); identical systems give p = 1. The interval is the 2.5/97.5 percentiles of the resampled
differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU

from prefixtune.evaluation.metrics import _check_inputs, _item_stats, mteval_bleu_metric
from prefixtune.evaluation.official_e2e import mteval_normalize

BLEU_TASKS = ("e2e", "webnlg", "dart", "generic")


def bleu_item_stats(
    task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[BLEU, np.ndarray]:
    """The task's BLEU metric and its per-item statistics (one row per item; corpus = row sum)."""
    if task not in BLEU_TASKS:
        raise ValueError(f"no BLEU for task {task!r}; expected one of {', '.join(BLEU_TASKS)}")
    _check_inputs(predictions, references)
    if task == "e2e":
        preds = [mteval_normalize(p) for p in predictions]
        refs = [[mteval_normalize(r) or None for r in rs] for rs in references]
        metric = mteval_bleu_metric()
        return metric, _item_stats(metric, preds, refs)
    metric = BLEU(lowercase=task != "generic")
    refs = [[r if r.strip() else None for r in rs] for rs in references]
    return metric, _item_stats(metric, predictions, refs)


def _mean_bleu(metric: BLEU, stats: list[np.ndarray], weights: np.ndarray | None) -> float:
    """Mean over runs of corpus BLEU, items weighted by how often the resample drew them."""
    scores = []
    for run in stats:
        total = run.sum(axis=0) if weights is None else weights @ run
        scores.append(float(metric._compute_score_from_stats(total).score))
    return float(np.mean(scores))


def paired_bootstrap(
    system_a: Sequence[Sequence[str]],
    system_b: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    *,
    task: str = "generic",
    n_boot: int = 1000,
    seed: int = 0,
    items: Sequence[int] | None = None,
) -> dict[str, float]:
    """Paired bootstrap of BLEU(a) - BLEU(b) over test items.

    system_a, system_b: each a list of runs, each run one prediction per item of `references`.
    items: score only these item indices (e.g. WebNLG's unseen category); default all.
    Returns a, b (mean corpus BLEU of each system's runs), diff (a - b), p, ci_low, ci_high,
    n_boot, items, runs_a, runs_b.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not system_a or not system_b:
        raise ValueError("each system needs at least one run of predictions")
    idx = list(range(len(references))) if items is None else list(items)
    if not idx:
        raise ValueError("no test items to compare")
    refs = [references[i] for i in idx]
    stats = []
    for system in (system_a, system_b):
        runs = []
        for run in system:
            if len(run) != len(references):
                raise ValueError(f"a run has {len(run)} predictions for {len(references)} items")
            metric, run_stats = bleu_item_stats(task, [run[i] for i in idx], refs)
            runs.append(run_stats)
        stats.append(runs)
    a, b = _mean_bleu(metric, stats[0], None), _mean_bleu(metric, stats[1], None)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for k in range(n_boot):
        weights = np.bincount(rng.integers(0, len(idx), len(idx)), minlength=len(idx))
        diffs[k] = _mean_bleu(metric, stats[0], weights) - _mean_bleu(metric, stats[1], weights)
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"a": a, "b": b, "diff": a - b, "p": p, "ci_low": float(low), "ci_high": float(high),
            "n_boot": n_boot, "items": len(idx), "runs_a": len(system_a),
            "runs_b": len(system_b)}  # fmt: skip


def verdict(diff_ci: tuple[float, float], paper_diff: float | None, paper_sign: int = 0) -> str:
    """The rule every report uses, on the 95% interval of our difference (ours: a - b).

    The paper's difference (paper_diff; or only its direction, paper_sign = +1/-1) is compared to
    the interval, never the levels (our base models differ from the paper's):
    - "reproduces": the interval excludes 0 on the paper's side;
    - "does not reproduce": it excludes 0 on the other side, or it holds 0 but excludes the
      paper's difference (no gap where the paper reports one);
    - "inconclusive at this power": it holds both 0 and the paper's difference (or only the
      direction is known and it holds 0).
    """
    low, high = diff_ci
    sign = (
        paper_sign if paper_diff is None else (1 if paper_diff > 0 else -1 if paper_diff < 0 else 0)
    )
    if sign == 0:
        raise ValueError("the paper's difference needs a direction (paper_diff != 0 or paper_sign)")
    if low > 0 or high < 0:
        return "reproduces" if (low > 0) == (sign > 0) else "does not reproduce"
    if paper_diff is not None and not low <= paper_diff <= high:
        return "does not reproduce"
    return "inconclusive at this power"
