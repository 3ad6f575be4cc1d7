"""How big an experiment is: the scales, the learning-rate grids, the seeds and subsamples.

tiny: a smoke test (a few steps, 4 test items; CI runs it on a tiny random model).
cpu: the 2-core CPU scale that finishes Table 1 E2E prefix vs fine-tune with LR tuning, 3 seeds
     and beam 5 on every E2E test input (630 MRs): see docs of `prefixtune reproduce`.
small: the older quick CPU scale (greedy, 100 test items, 2 seeds): a preview, not a test.
full: a GPU; the paper's settings (10 epochs, beam 5, every test input).

test = 0 scores every input of the test split. Learning rates are picked on dev (never test):
each grid value trains once with seed 0 and the lowest dev loss (or the highest dev BLEU when
select = "dev_bleu") wins; the other seeds then train at that value. A best value at an edge of
the grid adds the next value past it (the ratio of the two edge values), up to lr_extend more.
"""

from __future__ import annotations

from typing import Any

SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 3, "test": 4, "dev": 4, "seeds": 1, "sizes": (8, 16), "batch": 2,
             "new_tokens": 8, "beams": 1, "source_tokens": 40, "target_tokens": 16, "patience": 0,
             "train_size": 32, "lr_values": 2, "lr_extend": 0, "dev_bleu": 2, "select": "dev_loss"},
    "cpu": {"steps": 300, "test": 0, "dev": 200, "seeds": 3, "sizes": (50, 100, 200, 500),
            "batch": 8, "new_tokens": 64, "beams": 5, "source_tokens": 128, "target_tokens": 64,
            "patience": 3, "train_size": 2000, "lr_values": 3, "lr_extend": 2, "dev_bleu": 0,
            "select": "dev_loss"},
    "small": {"steps": 150, "test": 100, "dev": 100, "seeds": 2, "sizes": (50, 100, 200, 500),
              "batch": 8, "new_tokens": 64, "beams": 1, "source_tokens": 128, "target_tokens": 64,
              "patience": 3, "train_size": 2000, "lr_values": 3, "lr_extend": 0, "dev_bleu": 0,
              "select": "dev_loss"},
    "full": {"steps": 0, "test": 0, "dev": 500, "seeds": 5, "sizes": (50, 100, 200, 500),
             "batch": 5, "new_tokens": 100, "beams": 5, "source_tokens": 256, "target_tokens": 128,
             "patience": 0, "train_size": 0, "lr_values": 3, "lr_extend": 2, "dev_bleu": 200,
             "select": "dev_loss"},
}  # fmt: skip

# Per method, low to high; embedding-only prompts need much larger steps than the rest.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "prefix": (2e-4, 5e-4, 2e-3),
    "finetune": (1e-5, 5e-5, 2e-4),
    "ft-top2": (2e-5, 1e-4, 5e-4),
    "adapter": (1e-4, 5e-4, 2e-3),
    "embedding": (1e-3, 5e-3, 3e-2),
    "infix": (2e-4, 5e-4, 2e-3),
}

SELECTIONS = ("dev_loss", "dev_bleu")

# Table 1 trains every seed on one fixed subsample; low-data draws a new subsample per pair.
TABLE_SUBSAMPLE_SEED = 1000


def lr_grid(method: str, scale: dict[str, Any]) -> tuple[float, ...]:
    """The method's learning rates at this scale (the lowest and highest when lr_values = 2)."""
    values = LR_GRIDS[method]
    count = scale["lr_values"]
    if count >= len(values):
        return values
    if count == 1:
        return (values[len(values) // 2],)
    return (values[0], values[-1]) if count == 2 else values[:count]


def seed_pairs(scale: dict[str, Any], resample: bool) -> list[tuple[int, int]]:
    """(subsample seed, training seed) per repetition; the first pair is the tuning one.

    resample: a new subsample per pair (low-data), else one fixed subsample for every seed.
    """
    seeds = range(scale["seeds"])
    return [(100 + s if resample else TABLE_SUBSAMPLE_SEED, s) for s in seeds]


def scale_name(scale: dict[str, Any]) -> str:
    return next(name for name, known in SCALES.items() if known is scale)
