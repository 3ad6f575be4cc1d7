"""Learning rates picked on dev, the runs that follow, the scales and the committed results."""

from __future__ import annotations

import json
import math

import pytest

from prefixtune.config import ConfigError
from prefixtune.experiments.grid import GRIDS, table1_grid
from prefixtune.experiments.runs import Context, finished
from prefixtune.experiments.scales import LR_GRIDS, SCALES, lr_grid
from prefixtune.experiments.tables import tuning_table
from prefixtune.experiments.tuning import cell_grid, choose_lr, seed_runs, tuning_runs


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
    best = {"prefix": 5e-4, "finetune": 5e-5}  # inside their grids: nothing to extend
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
    tuned = _tuned(cells, scale, lambda s: abs(s.train["lr"] - LR_GRIDS[s.cell][1]))
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


def _cell(name: str, scale: dict):
    (cell,) = [c for c in table1_grid(scale) if c.name == name]
    return cell


def _tune_until_done(cell, scale, loss):
    """Round by round, as `reproduce` does: train every value the grid holds, then look again."""
    tuned = {}
    while todo := [s for s in tuning_runs([cell], scale, tuned) if s.name not in tuned]:
        tuned.update({s.name: {"dev_loss": loss(s.train["lr"])} for s in todo})
    return tuned


def test_a_best_value_at_the_top_edge_grows_the_grid_until_the_dev_loss_turns():
    scale = SCALES["cpu"]
    cell = _cell("finetune", scale)  # grid 1e-5, 5e-5, 2e-4: ratio 4 at the top
    tuned = _tune_until_done(cell, scale, lambda lr: abs(math.log(lr / 8e-4)))
    assert cell_grid(cell, tuned, scale) == (1e-5, 5e-5, 2e-4, 8e-4, 3.2e-3)
    assert choose_lr(cell, tuned, scale) == 8e-4
    record = seed_runs([cell], tuned, scale)[0].tuning
    assert record["extended"] == ["0.0008", "0.0032"] and not record["at_edge"]
    assert list(record["lr_grid"]) == ["1e-05", "5e-05", "0.0002", "0.0008", "0.0032"]


def test_a_best_value_at_the_bottom_edge_grows_the_grid_downwards_with_round_values():
    scale = SCALES["cpu"]
    cell = _cell("prefix", scale)  # 2e-4, 5e-4, 2e-3: ratio 2.5 at the bottom
    tuned = _tune_until_done(cell, scale, lambda lr: lr)  # always lower is better
    assert cell_grid(cell, tuned, scale) == (3.2e-5, 8e-5, 2e-4, 5e-4, 2e-3)  # lr_extend = 2
    assert choose_lr(cell, tuned, scale) == 3.2e-5
    assert "prefix-lr8e-05-s0" in tuned and "prefix-lr3.2e-05-s0" in tuned
    record = seed_runs([cell], tuned, scale)[0].tuning
    assert record["at_edge"]  # said, not hidden
    assert "(still at the grid's edge)" in tuning_table([{"cell": "prefix", "tuning": record}])


def test_an_inner_best_value_or_an_unfinished_grid_adds_nothing():
    scale = SCALES["cpu"]
    cell = _cell("prefix", scale)
    tuned = _tune_until_done(cell, scale, lambda lr: abs(lr - 5e-4))
    assert cell_grid(cell, tuned, scale) == LR_GRIDS["prefix"]
    partial = {k: v for k, v in tuned.items() if "lr0.002" not in k}
    partial["prefix-lr0.0002-s0"] = {"dev_loss": 0.0}  # best so far at the edge, 2e-3 unrun
    assert cell_grid(cell, partial, scale) == LR_GRIDS["prefix"]
    with pytest.raises(ConfigError, match="lr 0.002 has not finished"):
        choose_lr(cell, partial, scale)
    assert cell_grid(cell, tuned, SCALES["small"]) == LR_GRIDS["prefix"]  # lr_extend 0


def test_an_extension_that_diverges_stops_the_growth_and_the_edge_value_stays_chosen():
    scale = SCALES["cpu"]
    cell = _cell("finetune", scale)
    tuned = _tune_until_done(cell, scale, lambda lr: float("nan") if lr > 2e-4 else -lr)
    assert cell_grid(cell, tuned, scale) == (1e-5, 5e-5, 2e-4, 8e-4)
    assert choose_lr(cell, tuned, scale) == 2e-4
    assert not seed_runs([cell], tuned, scale)[0].tuning["at_edge"]


def test_reproduce_trains_the_extended_values_in_later_rounds_and_reports_them(monkeypatch):
    import argparse

    from prefixtune.cli import reproduce

    scale = SCALES["cpu"]
    cell = _cell("finetune", scale)
    rounds, files = [], {}

    def run_all(todo, ctx, jobs, executor):
        rounds.append([s.name for s in todo])
        for s in todo:
            files[s.name] = {"dev_loss": -s.train["lr"]}  # higher is better, forever
        return [files[s.name] for s in todo]

    monkeypatch.setattr(reproduce, "run_all", run_all)
    monkeypatch.setattr(reproduce, "finished", lambda spec, ctx: files.get(spec.name))
    args = argparse.Namespace(report_only=False, jobs=2, executor="processes")
    tuned = reproduce._tune(args, [cell], scale, None)
    assert rounds == [["finetune-lr1e-05-s0", "finetune-lr5e-05-s0", "finetune-lr0.0002-s0"],
                      ["finetune-lr0.0008-s0"], ["finetune-lr0.0032-s0"]]  # fmt: skip
    assert reproduce._tune(argparse.Namespace(report_only=True), [cell], scale, None) == tuned
    assert len(rounds) == 3  # --report-only trained nothing
