"""`prefixtune reproduce` at the tiny scale on a tiny random model (real E2E data)."""

from __future__ import annotations

import csv

import pytest

from prefixtune.cli.main import main
from prefixtune.data.readers import load_examples
from prefixtune.data.records import SPLITS, data_dir
from prefixtune.experiments.grid import SCALES, init_grid, lowdata_grid, summarise, xsum_grid

needs_data = pytest.mark.skipif(not (data_dir() / "e2e").exists(), reason="no E2E data dir")


@needs_data
def test_tiny_experiment_writes_table_and_plot_and_resumes(model_dir, tmp_path, capsys):
    experiment = "length"  # each run's evaluation starts a JVM for METEOR: keep the grid small
    argv = ["reproduce", experiment, "--scale", "tiny", "--model", str(model_dir),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]  # fmt: skip
    assert main([*argv, "--jobs", "2"]) == 0  # two spawned workers, rows back in grid order
    out = tmp_path / "results" / experiment
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["length"] for r in rows] == ["1", "5"]
    assert all(0 <= float(r["BLEU"]) <= 100 for r in rows)
    assert (out / f"{experiment}.png").stat().st_size > 1000
    assert "Command: `prefixtune reproduce" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # every run has its result.json: nothing is trained again
    assert "train" not in capsys.readouterr().err
    (tmp_path / "runs" / f"{experiment}-tiny" / "len5" / "result.json").unlink()
    assert main([*argv, "--report-only"]) == 0  # trains nothing, reports the finished run
    assert "1 of 2 runs finished" in (out / "results.md").read_text()
    assert [r["length"] for r in csv.DictReader((out / "results.csv").open())] == ["1"]
    assert not (tmp_path / "runs" / f"{experiment}-tiny" / "len5" / "result.json").exists()


def test_report_only_without_finished_runs_is_one_clear_error(tmp_path, capsys):
    argv = ["reproduce", "length", "--scale", "tiny", "--report-only", "--runs", str(tmp_path)]
    assert main(argv) != 0
    assert "no finished runs to report" in capsys.readouterr().err


def test_bad_jobs_count_is_one_clear_error(tmp_path, capsys):
    assert main(["reproduce", "length", "--scale", "tiny", "--jobs", "0"]) != 0
    assert "--jobs must be at least 1" in capsys.readouterr().err


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


needs_xsum = pytest.mark.skipif(not (data_dir() / "xsum").exists(), reason="no XSum data dir")


def test_xsum_grids_compare_prefix_and_finetune_in_the_tldr_format():
    plain, sports = xsum_grid(SCALES["small"]), xsum_grid(SCALES["small"], sports=True)
    assert [s.labels["method"] for s in plain] == ["prefix", "finetune"]
    assert all(s.train["separator"] == "\nTL;DR: " for s in plain + sports)
    assert {s.test_split for s in plain} == {"test"}
    assert {(s.train["train_split"], s.train["dev_split"], s.test_split) for s in sports} == {
        ("news-train", "news-dev", "sports-test")
    }


@needs_xsum
def test_news_to_sports_splits_are_disjoint_and_drawn_from_ours():
    ids = {s: {e.meta["id"] for e in load_examples("xsum", s)} for s in SPLITS["xsum"]}
    assert ids["news-train"] < ids["train"] and ids["news-dev"] < ids["dev"]
    assert not (ids["news-train"] | ids["news-dev"]) & ids["sports-test"]
    assert 50 < len(ids["sports-test"]) < 500  # sport is one BBC section among many


@needs_xsum
def test_tiny_news_to_sports_writes_the_paper_table_layout(model_dir, tmp_path):
    argv = ["reproduce", "xsum-sports", "--scale", "tiny", "--model", str(model_dir),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]  # fmt: skip
    assert main(argv) == 0
    table = (tmp_path / "results" / "xsum-sports" / "results.md").read_text()
    assert "| method | % params | % trained | ROUGE_1 | ROUGE_2 | ROUGE_L |" in table
    prefix_row, finetune_row = (line for line in table.splitlines() if line.startswith("| ") and
                                line.split("|")[1].strip() in ("prefix", "finetune"))  # fmt: skip
    assert "100%" in finetune_row and "100%" not in prefix_row
    report = tmp_path / "runs" / "xsum-sports-tiny" / "prefix" / "eval-sports-test" / "metrics.json"
    assert report.exists()
