"""The claim tables: paired bootstrap on committed prediction files, verdict by the stated rule."""

from __future__ import annotations

import json
import random

from prefixtune.data.records import Example
from prefixtune.experiments.claims import comparisons
from prefixtune.experiments.grid import lowdata_grid, table1_grid
from prefixtune.experiments.runs import sources_digest
from prefixtune.experiments.scales import SCALES
from prefixtune.experiments.tables import claims_table, tuning_table

WORDS = ["the", "eagle", "is", "a", "cheap", "coffee", "shop", "near", "burger", "king", "river"]


def _items(n: int) -> list[Example]:
    rng = random.Random(0)
    refs = [tuple(" ".join(rng.choices(WORDS, k=10)) for _ in range(3)) for _ in range(n)]
    return [Example(f"name : item{i}", r[0], r, {"seen": "seen" if i % 2 else "unseen"})
            for i, r in enumerate(refs)]  # fmt: skip


def _write(out, run: str, cell: str, items, keep: float, seed: int) -> dict:
    rng = random.Random(seed)
    predictions = [" ".join(w if rng.random() < keep else "xyz" for w in e.target.split())
                   for e in items]  # fmt: skip
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run}.predictions.json").write_text(
        json.dumps(
            {"items": len(items), "sources_sha": sources_digest(items), "predictions": predictions}
        )
    )
    return {"run": run, "cell": cell}


def test_a_clearly_better_prefix_reproduces_table1_and_identical_systems_are_inconclusive(tmp_path):
    items = _items(60)
    rows = [_write(tmp_path, f"prefix-s{s}", "prefix", items, 0.95, s) for s in range(3)]
    rows += [_write(tmp_path, f"finetune-s{s}", "finetune", items, 0.5, 10 + s) for s in range(3)]
    cells = [c for c in table1_grid(SCALES["cpu"]) if c.name in ("prefix", "finetune")]
    text = claims_table(comparisons("table1", cells), rows, tmp_path, items, "e2e", 500)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("| Table 1 e2e: prefix")]
    assert "69.7 vs 68.2 (+1.5)" in line and "(n = 3/3)" in line
    assert line.rstrip(" |").endswith("reproduces") and "| 0.000 |" in line

    same = [_write(tmp_path, f"finetune-s{s}", "finetune", items, 0.95, s) for s in range(3)]
    text = claims_table(comparisons("table1", cells), rows[:3] + same, tmp_path, items, "e2e", 200)
    assert "| +0.00 | 1.000 | [+0.00, +0.00] | does not reproduce |" in text  # no gap at all


def test_webnlg_claims_score_each_category_on_its_own_items(tmp_path):
    items = _items(40)
    rows = [_write(tmp_path, "prefix-s0", "prefix", items, 0.9, 1),
            _write(tmp_path, "finetune-s0", "finetune", items, 0.9, 1)]  # fmt: skip
    cells = [c for c in table1_grid(SCALES["cpu"], "webnlg") if c.name in ("prefix", "finetune")]
    text = claims_table(comparisons("table1-webnlg", cells), rows, tmp_path, items, "webnlg", 50)
    for col, paper in (("seen", "-1.3"), ("unseen", "+17.9"), ("all", "+8.6")):
        assert f"Table 1 {col}: prefix vs fine-tune" in text and f"({paper})" in text


def test_lowdata_claims_pair_each_size_and_predictions_on_other_items_are_refused(tmp_path):
    items = _items(10)
    cells = lowdata_grid(SCALES["cpu"])
    claims = comparisons("lowdata", cells)
    assert [(c.a, c.b, c.paper_sign) for c in claims][0] == ("prefix-n50", "finetune-n50", 1)
    rows = [_write(tmp_path, "p", "prefix-n50", items, 0.9, 1),
            _write(tmp_path, "f", "finetune-n50", items[:9] + items[:1], 0.9, 1)]  # fmt: skip
    try:
        claims_table(claims, rows, tmp_path, items, "e2e", 10)
    except ValueError as error:
        assert "other test items" in str(error)
    else:
        raise AssertionError("predictions of other items were compared")


def test_tuning_table_lists_every_lr_and_the_choice():
    record = {"lr_grid": {"0.0002": {"dev_loss": 2.5, "dev_bleu": None},
                          "0.002": {"dev_loss": 2.0, "dev_bleu": None}},
              "selected_by": "dev_loss", "lr": 0.002}  # fmt: skip
    text = tuning_table(
        [{"cell": "prefix", "tuning": record}, {"cell": "prefix", "tuning": record}]
    )
    assert "| prefix | 0.0002: 2.5000; 0.002: 2.0000 | 0.002 | dev_loss |" in text
