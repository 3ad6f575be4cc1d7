"""`prefixtune reproduce` at the tiny scale on a tiny random model (real E2E data)."""

from __future__ import annotations

import csv

import pytest

from prefixtune.cli import main
from prefixtune.data import data_dir
from prefixtune.experiments import SCALES, init_grid, lowdata_grid, summarise

needs_data = pytest.mark.skipif(not (data_dir() / "e2e").exists(), reason="no E2E data dir")


@needs_data
def test_tiny_experiment_writes_table_and_plot_and_resumes(model_dir, tmp_path, capsys):
    experiment = "length"  # each run's evaluation starts a JVM for METEOR: keep the grid small
    argv = ["reproduce", experiment, "--scale", "tiny", "--model", str(model_dir),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "results" / experiment
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["length"] for r in rows] == ["1", "5"]
    assert all(0 <= float(r["BLEU"]) <= 100 for r in rows)
    assert (out / f"{experiment}.png").stat().st_size > 1000
    assert "Command: `prefixtune reproduce" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # every run has its result.json: nothing is trained again
    assert "train" not in capsys.readouterr().err


def test_summarise_means_and_spread_across_seeds():
    rows = [{"size": 50, "BLEU": 10.0}, {"size": 50, "BLEU": 20.0}, {"size": 100, "BLEU": 30.0}]
    table = summarise(rows, "size", ("BLEU",))
    assert table[0] == {"size": 50, "runs": 2, "BLEU": 15.0, "BLEU_sd": pytest.approx(7.0710678)}
    assert table[1]["BLEU_sd"] == 0.0


def test_init_grid_compares_random_and_real_words_on_the_same_seeds():
    grid = init_grid(SCALES["small"])
    inits = {s.labels["init"] for s in grid}
    assert "random" in inits and "table-to-text:" in inits and "elephant" in inits
    assert {s.train["train_size"] for s in grid} == {50}


def test_lowdata_grid_pairs_methods_on_the_same_subsamples():
    grid = lowdata_grid(SCALES["small"])
    prefix = {(s.labels["size"], s.labels["seed"]) for s in grid if s.labels["method"] == "prefix"}
    finetune = {
        (s.labels["size"], s.labels["seed"]) for s in grid if s.labels["method"] == "finetune"
    }
    assert prefix == finetune and len(prefix) == 4 * 2
