"""Learning rates picked on dev, the runs that follow, the scales and the committed results."""

from __future__ import annotations

import json

import pytest

from prefixtune.config import ConfigError
from prefixtune.experiments.grid import GRIDS, table1_grid
from prefixtune.experiments.runs import Context, finished
from prefixtune.experiments.scales import LR_GRIDS, SCALES, lr_grid
from prefixtune.experiments.tuning import choose_lr, seed_runs, tuning_runs


def _tuned(cells, scale, score):
    return {
        s.name: {"dev_loss": score(s), "dev_bleu": -score(s)} for s in tuning_runs(cells, scale)
    }


def test_each_method_tunes_over_its_own_grid_with_seed_zero_only():
    scale = SCALES["cpu"]
    runs = tuning_runs(table1_grid(scale), scale)
    assert {s.train["seed"] for s in runs} == {0} and all(s.tune for s in runs)
    by_cell = {
        c: sorted(s.train["lr"] for s in runs if s.cell == c) for c in {s.cell for s in runs}
    }
    assert by_cell["prefix"] == sorted(LR_GRIDS["prefix"])
    assert by_cell["finetune"] == sorted(LR_GRIDS["finetune"])
    assert max(by_cell["embedding"]) == pytest.approx(3e-2)
    assert lr_grid("prefix", SCALES["tiny"]) == (2e-4, 2e-3)


@pytest.mark.parametrize("select", ["dev_loss", "dev_bleu"])
def test_the_best_dev_score_picks_the_lr_and_every_seed_trains_at_it(select):
    scale = {**SCALES["cpu"], "select": select}
    cells = [c for c in table1_grid(scale) if c.name in ("prefix", "finetune")]
    best = {"prefix": 5e-4, "finetune": 2e-4}
    tuned = _tuned(cells, scale, lambda s: abs(s.train["lr"] - best[s.cell]))
    for cell in cells:
        assert choose_lr(cell, tuned, scale) == best[cell.name]
    runs = seed_runs(cells, tuned, scale)
    assert sorted((s.cell, s.train["seed"]) for s in runs) == [
        (c, k) for c in ("finetune", "prefix") for k in range(3)
    ]
    assert all(s.train["lr"] == best[s.cell] for s in runs)
    assert {s.train["subsample_seed"] for s in runs} == {1000}  # Table 1: one fixed subsample
    seed0 = [s for s in runs if s.train["seed"] == 0]
    assert {s.name for s in seed0} <= set(tuned)  # the tuning run is not trained twice
    assert runs[0].tuning["selected_by"] == select and len(runs[0].tuning["lr_grid"]) == 3


def test_unfinished_tuning_holds_back_that_cell_only():
    scale = SCALES["cpu"]
    cells = [c for c in table1_grid(scale) if c.name in ("prefix", "finetune")]
    tuned = _tuned(cells, scale, lambda s: s.train["lr"])
    tuned = {k: v for k, v in tuned.items() if not k.startswith("prefix-lr0.002")}
    assert {s.cell for s in seed_runs(cells, tuned, scale)} == {"finetune"}
    with pytest.raises(ConfigError, match="lr 0.002 has not finished"):
        choose_lr(cells[0], tuned, scale)


def test_a_nan_dev_loss_never_wins():
    scale = SCALES["cpu"]
    (cell,) = [c for c in table1_grid(scale) if c.name == "prefix"]
    tuned = _tuned(
        [cell], scale, lambda s: float("nan") if s.train["lr"] == 2e-4 else s.train["lr"]
    )
    assert choose_lr(cell, tuned, scale) == 5e-4


@pytest.mark.parametrize("select", ["dev_loss", "dev_bleu"])
def test_no_finite_dev_score_is_refused_naming_the_cell_and_the_scores(select):
    scale = {**SCALES["cpu"], "select": select}
    (cell,) = [c for c in table1_grid(scale) if c.name == "prefix"]
    bad = {2e-4: float("nan"), 5e-4: float("inf")}
    tuned = {s.name: {k: bad.get(s.train["lr"]) for k in ("dev_loss", "dev_bleu")}
             for s in tuning_runs([cell], scale)}  # fmt: skip  # 2e-3: None (not scored)
    with pytest.raises(ConfigError, match=rf"cell prefix: no tuning run has a finite {select} "
                                          r"\(lr 0.0002: nan, lr 0.0005: inf, lr 0.002: None\)"):  # fmt: skip
        choose_lr(cell, tuned, scale)
    with pytest.raises(ConfigError, match="no tuning run has a finite"):
        seed_runs([cell], tuned, scale)  # not silently held back like an unfinished cell


def test_cpu_and_full_scales_score_every_test_input_with_beam_five():
    for name in ("cpu", "full"):
        assert SCALES[name]["test"] == 0 and SCALES[name]["beams"] == 5
        assert SCALES[name]["seeds"] >= 3
    assert SCALES["tiny"]["test"] > 0


def test_dart_column_trains_every_table1_method_on_dart():
    cells = GRIDS["table1-dart"](SCALES["cpu"])
    assert {c.train["data"] for c in cells} == {"dart"} and len(cells) == 7


def test_a_result_file_of_another_scale_or_model_is_refused(tmp_path):
    scale = SCALES["tiny"]
    spec = tuning_runs(table1_grid(scale), scale)[0]
    ctx = Context(tmp_path / "runs", tmp_path / "out", "tiny", "")
    (tmp_path / "out" / "tune").mkdir(parents=True)
    path = tmp_path / "out" / "tune" / f"{spec.name}.json"
    path.write_text(json.dumps({"scale": "tiny", "model": "", "dev_loss": 1.0}))
    assert finished(spec, ctx)["dev_loss"] == 1.0
    path.write_text(json.dumps({"scale": "cpu", "model": "", "dev_loss": 1.0}))
    with pytest.raises(ConfigError, match="another --results folder"):
        finished(spec, ctx)


def test_unknown_cells_are_one_clear_error(tmp_path, capsys):
    from prefixtune.cli.main import main

    argv = ["reproduce", "table1", "--scale", "tiny", "--cells", "prefix,nope",
            "--results", str(tmp_path)]  # fmt: skip
    assert main(argv) != 0
    assert "--cells: unknown ['nope']" in capsys.readouterr().err
