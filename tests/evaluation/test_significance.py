"""The paired bootstrap test against cases with a known answer."""

from __future__ import annotations

import random

import pytest
from sacrebleu.metrics import BLEU

from prefixtune.evaluation.significance import bleu_item_stats, paired_bootstrap, verdict

WORDS = [
    "the",
    "cafe",
    "serves",
    "cheap",
    "food",
    "near",
    "the",
    "river",
    "in",
    "the",
    "city",
    "centre",
    "with",
    "high",
    "ratings",
]


def _refs(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[" ".join(rng.choices(WORDS, k=12)) for _ in range(2)] for _ in range(n)]


def _noisy(refs: list[list[str]], keep: float, seed: int) -> list[str]:
    """The first reference of each item with each word kept with probability `keep`."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() < keep else "zzz" for w in r[0].split()) for r in refs]


def test_identical_systems_give_p_one_and_an_interval_of_zero():
    refs = _refs(60)
    preds = _noisy(refs, 0.6, 1)
    result = paired_bootstrap([preds], [preds], refs, task="e2e", n_boot=300)
    assert result["diff"] == 0 and result["p"] == 1.0
    assert result["ci_low"] == 0 == result["ci_high"]


def test_a_clearly_better_system_is_significant_and_its_interval_excludes_zero():
    refs = _refs(80)
    good = [_noisy(refs, 0.9, s) for s in (1, 2, 3)]
    bad = [_noisy(refs, 0.4, s) for s in (4, 5, 6)]
    result = paired_bootstrap(good, bad, refs, task="dart", n_boot=1000)
    assert result["p"] < 0.05 and result["ci_low"] > 0
    assert result["diff"] == pytest.approx(result["a"] - result["b"])
    assert result["runs_a"] == result["runs_b"] == 3
    swapped = paired_bootstrap(bad, good, refs, task="dart", n_boot=1000)
    assert swapped["ci_high"] < 0 and swapped["p"] < 0.05


def test_two_equally_good_systems_are_not_significant_most_of_the_time():
    refs = _refs(80)
    ps = [paired_bootstrap([_noisy(refs, 0.7, s)], [_noisy(refs, 0.7, 100 + s)], refs,
                           n_boot=300, seed=s)["p"] for s in range(8)]  # fmt: skip
    assert sum(p < 0.05 for p in ps) <= 2  # ~5% false positives expected


def test_system_scores_are_the_task_corpus_bleu_and_items_select_a_subset():
    refs = _refs(30)
    preds = _noisy(refs, 0.8, 7)
    result = paired_bootstrap([preds], [preds], refs, task="generic", n_boot=10)
    assert result["a"] == pytest.approx(
        BLEU().corpus_score(preds, [[r[0] for r in refs], [r[1] for r in refs]]).score
    )
    part = paired_bootstrap([preds], [preds], refs, task="generic", n_boot=10, items=range(10))
    assert part["items"] == 10
    assert part["a"] == pytest.approx(
        BLEU()
        .corpus_score(preds[:10], [[r[0] for r in refs[:10]], [r[1] for r in refs[:10]]])
        .score
    )


def test_bad_inputs_are_named():
    refs = _refs(5)
    with pytest.raises(ValueError, match="predictions for 5 items"):
        paired_bootstrap([["x"]], [["x"] * 5], refs)
    with pytest.raises(ValueError, match="no BLEU for task"):
        bleu_item_stats("xsum", ["a"], [["a"]])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([["a"] * 5], [["a"] * 5], refs, n_boot=0)


def test_verdict_rule():
    assert verdict((0.5, 2.0), 1.5) == "reproduces"
    assert verdict((-2.0, -0.5), 1.5) == "does not reproduce"
    assert verdict((-0.3, 0.4), 1.5) == "does not reproduce"  # no gap where the paper has one
    assert verdict((-0.3, 2.0), 1.5) == "inconclusive at this power"
    assert verdict((-0.3, 2.0), None, paper_sign=1) == "inconclusive at this power"
    assert verdict((0.1, 2.0), None, paper_sign=-1) == "does not reproduce"
    with pytest.raises(ValueError, match="direction"):
        verdict((0, 1), None)
