"""Corpus metrics for the prefix-tuning tasks, on the paper's scales.

Every public function takes ``predictions`` (one string per item) and ``references`` (a list of
reference strings per item) and returns ``dict[str, float]``; nothing is read or written.

=========  ==========================  =======  ============================================
task       key                         scale    implementation
=========  ==========================  =======  ============================================
e2e        BLEU                        x100     sacrebleu corpus BLEU on mteval-normalised
                                                text = mteval-v13a, as the official E2E script
e2e        NIST                        raw      hand-written mteval-v13a NIST (metrics_e2e)
e2e        METEOR                      x100     METEOR 1.5 jar via ``pycocoevalcap`` (Java) on
                                                Stanford-PTB-tokenised text, as COCO/E2E
e2e        ROUGE_L                     x100     ``pycocoevalcap`` Rouge on PTB tokens
e2e        CIDEr                       raw      ``pycocoevalcap`` Cider (CIDEr-D) on PTB tokens
webnlg,    BLEU                        x100     sacrebleu BLEU, 13a tokens, lowercased
dart       METEOR                      0-1      METEOR 1.5 jar via ``pycocoevalcap`` (``-norm``)
           TER                         0-1      sacrebleu TER / 100 (lower is better)
webnlg     <key>_seen/_unseen/_all     as above same, on the items of each category
xsum       ROUGE_1, ROUGE_2, ROUGE_L   x100     ``rouge-score`` F1 with Porter stemming, best
                                                reference per item, mean over items
generic    BLEU, ROUGE_L               x100     sacrebleu default BLEU; ``rouge-score`` rougeL
any        BLEU_ci_low, BLEU_ci_high   as BLEU  95% percentile bootstrap over items (optional)
=========  ==========================  =======  ============================================

The E2E numbers equal the official script (tuetschek/e2e-metrics ``measure_scores.py``) to 1e-4
on real dev data (see tests). WebNLG/DART METEOR and TER are fractions because the paper prints
them so. METEOR and the Stanford PTB tokeniser need Java: without a ``java`` on PATH, METEOR is
left out of the result with a ``RuntimeWarning``, and E2E ROUGE_L/CIDEr fall back to a
pure-Python approximation of the PTB tokeniser (the warning says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, TER

from prefixtune.config import METRIC_TASKS
from prefixtune.evaluation.official_e2e import (
    JavaNotFoundError,
    coco_scores,
    java_available,
    meteor_score,
    meteor_session,
    mteval_bleu_metric,
    mteval_nist,
    mteval_normalize,
    optional_meteor,
    ptb_tokenize,
)

__all__ = [
    "TASKS",
    "JavaNotFoundError",
    "bleu_bootstrap_ci",
    "dart_scores",
    "e2e_scores",
    "generic_scores",
    "java_available",
    "meteor",
    "ptb_tokenize",
    "score",
    "webnlg_scores",
    "xsum_scores",
]

TASKS = METRIC_TASKS
CATEGORIES = ("seen", "unseen")


# --------------------------------------------------------------------------- input checks


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ValueError naming the problem with the inputs, if any."""
    if len(predictions) != len(references):
        raise ValueError(
            f"length mismatch: {len(predictions)} predictions but {len(references)} reference lists"
        )
    if not predictions:
        raise ValueError("nothing to score: predictions and references are empty")
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(pred, str):
            raise ValueError(f"prediction {i} is {type(pred).__name__}, not str")
        if isinstance(refs, str):
            raise ValueError(
                f"references[{i}] is a string; give a list of reference strings per item"
            )
        if len(refs) == 0:
            raise ValueError(f"item {i} has zero references")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] holds a non-string reference")
        if not any(r.strip() for r in refs):
            raise ValueError(f"item {i} has only empty references")


def _ref_streams(references: Sequence[Sequence[str | None]]) -> list[list[str | None]]:
    """Transpose per-item reference lists to sacrebleu streams, padding with None."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


# --------------------------------------------------------------------------- BLEU + bootstrap


def _item_stats(metric: BLEU | TER, predictions: Sequence[str], references: Sequence) -> np.ndarray:
    """sacrebleu's per-item sufficient statistics (one row per item; corpus score = row sum)."""
    streams = _ref_streams(references)
    return np.asarray(metric._extract_corpus_statistics(list(predictions), streams), dtype=float)


def _corpus(metric: BLEU | TER, stats: np.ndarray) -> float:
    """Corpus score from summed per-item statistics (what ``metric.corpus_score`` does)."""
    return float(metric._compute_score_from_stats(stats.sum(axis=0)).score)


def _bleu_from_stats(metric: BLEU, stats: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """BLEU (x100) and, when ``n_boot`` > 0, its 95% percentile bootstrap CI over items."""
    out = {"BLEU": _corpus(metric, stats)}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(n_boot):
            weights = np.bincount(rng.integers(0, len(stats), len(stats)), minlength=len(stats))
            boot.append(float(metric._compute_score_from_stats(weights @ stats).score))
        low, high = np.percentile(boot, [2.5, 97.5])
        out.update(BLEU_ci_low=float(low), BLEU_ci_high=float(high))
    return out


def _bleu(
    metric: BLEU,
    predictions: Sequence[str],
    references: Sequence[Sequence[str | None]],
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Corpus BLEU (x100) with ``metric``, plus a bootstrap CI when ``n_boot`` > 0."""
    return _bleu_from_stats(metric, _item_stats(metric, predictions, references), n_boot, seed)


def bleu_bootstrap_ci(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n_boot: int = 1000,
    seed: int = 0,
    lowercase: bool = False,
) -> dict[str, float]:
    """sacrebleu BLEU (x100) and its 95% bootstrap CI: keys BLEU, BLEU_ci_low, BLEU_ci_high.

    Items are resampled with replacement ``n_boot`` times (seeded) and the corpus BLEU of each
    resample is recomputed from per-item statistics; the CI is the 2.5/97.5 percentiles.
    """
    _check_inputs(predictions, references)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return _bleu(BLEU(lowercase=lowercase), predictions, references, n_boot, seed)


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 (0-1, ``-l en -norm``), multi-reference. Raises JavaNotFoundError."""
    _check_inputs(predictions, references)
    with meteor_session() as scorer:
        return meteor_score(scorer, predictions, references)


# --------------------------------------------------------------------------- task scorers


def e2e_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Official E2E metrics: BLEU, NIST, METEOR, ROUGE_L, CIDEr (BLEU/METEOR/ROUGE_L x100).

    ``references`` holds every human reference of each meaning representation (the official
    script groups references by MR). ``bootstrap`` > 0 adds BLEU_ci_low/BLEU_ci_high.
    """
    _check_inputs(predictions, references)
    preds = [mteval_normalize(p) for p in predictions]
    refs = [[mteval_normalize(r) or None for r in rs] for rs in references]
    out = _bleu(mteval_bleu_metric(), preds, refs, bootstrap, seed)
    out["NIST"] = mteval_nist(predictions, references)
    out.update(coco_scores(predictions, references))
    order = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "BLEU_ci_low", "BLEU_ci_high"]
    return {k: out[k] for k in order if k in out}


def _triple_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    meteor_scorer: Any | None,
    bootstrap: int,
    seed: int,
    subsets: dict[str, list[int]],
) -> dict[str, float]:
    """BLEU (x100), METEOR (0-1), TER (0-1) on each subset of items, keys ``<metric><suffix>``.

    Per-item BLEU/TER statistics are computed once (sacrebleu TER is slow) and summed per subset.
    """
    refs = [[r if r.strip() else None for r in rs] for rs in references]
    bleu, ter = BLEU(lowercase=True), TER()
    bleu_stats = _item_stats(bleu, predictions, refs)
    ter_stats = _item_stats(ter, predictions, refs)
    out: dict[str, float] = {}
    for suffix, idx in subsets.items():
        part = _bleu_from_stats(bleu, bleu_stats[idx], bootstrap, seed)
        if meteor_scorer is not None:
            sub_refs = [references[i] for i in idx]
            part["METEOR"] = meteor_score(meteor_scorer, [predictions[i] for i in idx], sub_refs)
        part["TER"] = _corpus(ter, ter_stats[idx]) / 100
        order = ["BLEU", "METEOR", "TER", "BLEU_ci_low", "BLEU_ci_high"]
        out.update({k + suffix: part[k] for k in order if k in part})
    return out


def dart_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """DART: BLEU (x100, lowercased 13a), METEOR (0-1), TER (0-1, lower is better)."""
    _check_inputs(predictions, references)
    with optional_meteor() as scorer:
        every = {"": list(range(len(predictions)))}
        return _triple_scores(predictions, references, scorer, bootstrap, seed, every)


def webnlg_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    categories: Sequence[str] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """WebNLG: BLEU (x100), METEOR (0-1), TER (0-1, lower is better).

    With ``categories`` (one "seen"/"unseen" label per item) every metric is also given for the
    seen (S), unseen (U) and all (A) items as ``<key>_seen``, ``<key>_unseen``, ``<key>_all``;
    the unsuffixed keys are always the whole set. A category with no items is left out.
    """
    _check_inputs(predictions, references)
    subsets = {"": list(range(len(predictions)))}
    if categories is not None:
        _check_categories(categories, len(predictions))
        for label in CATEGORIES:
            idx = [i for i, c in enumerate(categories) if c == label]
            if idx:
                subsets[f"_{label}"] = idx
    with optional_meteor() as scorer:
        out = _triple_scores(predictions, references, scorer, bootstrap, seed, subsets)
    if categories is not None:
        out.update({f"{k}_all": v for k, v in list(out.items()) if not k.endswith(CATEGORIES)})
    return out


def _check_categories(categories: Sequence[str], n: int) -> None:
    if isinstance(categories, str) or len(categories) != n:
        raise ValueError(f"categories must be a list of {n} labels, one per prediction")
    bad = sorted({c for c in categories if c not in CATEGORIES})
    if bad:
        raise ValueError(f"unknown categories {bad}; expected 'seen' or 'unseen'")


def _rouge(
    predictions: Sequence[str], references: Sequence[Sequence[str]], types: Sequence[str]
) -> dict[str, float]:
    """Mean rouge-score F1 (x100, stemmed), best reference per item; keys ROUGE_1 etc."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi([r for r in refs if r.strip()], pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {"ROUGE_" + t[5:].upper(): 100 * v / len(predictions) for t, v in totals.items()}


def xsum_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """XSum: ROUGE_1, ROUGE_2, ROUGE_L (rouge-score F1 with stemming, x100)."""
    _check_inputs(predictions, references)
    return _rouge(predictions, references, ["rouge1", "rouge2", "rougeL"])


def generic_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Any task: sacrebleu BLEU (x100, default 13a, cased) and rouge-score ROUGE_L (x100)."""
    _check_inputs(predictions, references)
    refs = [[r if r.strip() else None for r in rs] for rs in references]
    out = _bleu(BLEU(), predictions, refs, bootstrap, seed)
    out.update(_rouge(predictions, references, ["rougeL"]))
    return out


def score(
    task: str,
    predictions: list[str],
    references: list[list[str]],
    categories: list[str] | None = None,
    bootstrap: int = 0,
) -> dict[str, float]:
    """Score ``predictions`` for ``task`` ("e2e", "webnlg", "dart", "xsum", "generic").

    ``categories`` ("seen"/"unseen" per item) is for webnlg only. ``bootstrap`` > 0 adds a 95%
    CI of BLEU from that many resamples (BLEU_ci_low/BLEU_ci_high; ignored for xsum).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if categories is not None and task != "webnlg":
        raise ValueError(f"categories are only used for task 'webnlg', not {task!r}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 (number of resamples), got {bootstrap}")
    if task == "xsum":
        if bootstrap:
            warnings.warn("xsum has no BLEU: bootstrap is ignored", RuntimeWarning, stacklevel=2)
        return xsum_scores(predictions, references)
    if task == "webnlg":
        return webnlg_scores(predictions, references, categories, bootstrap)
    scorer = {"e2e": e2e_scores, "dart": dart_scores, "generic": generic_scores}[task]
    return scorer(predictions, references, bootstrap)
