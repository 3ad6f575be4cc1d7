"""`prefixtune reproduce` at the tiny scale on a tiny random model (real E2E data)."""

from __future__ import annotations

import csv
import json

import pytest

from prefixtune.cli.main import main
from prefixtune.data.readers import load_examples
from prefixtune.data.records import SPLITS, data_dir
from prefixtune.experiments.grid import init_grid, lowdata_grid, xsum_grid
from prefixtune.experiments.scales import LR_GRIDS, SCALES
from prefixtune.experiments.tables import summarise
from prefixtune.experiments.tuning import seed_runs, tuning_runs

needs_data = pytest.mark.skipif(not (data_dir() / "e2e").exists(), reason="no E2E data dir")


@needs_data
def test_tiny_experiment_tunes_on_dev_writes_committed_results_and_resumes(model_dir, tmp_path,
                                                                           capsys):  # fmt: skip
    experiment = "length"  # each run's evaluation starts a JVM for METEOR: keep the grid small
    results = tmp_path / "results"
    argv = ["reproduce", experiment, "--scale", "tiny", "--model", str(model_dir),
            "--runs", str(tmp_path / "runs"), "--results", str(results)]  # fmt: skip
    assert main([*argv, "--jobs", "2"]) == 0  # two spawned workers, rows back in grid order
    out = results / f"{experiment}-{model_dir.name}"
    tuned = sorted(p.name for p in (out / "tune").glob("*.json"))
    assert tuned == ["len1-lr0.0002-s0.json", "len1-lr0.002-s0.json", "len5-lr0.0002-s0.json",
                     "len5-lr0.002-s0.json"]  # fmt: skip
    tune_rows = {p.stem: json.loads(p.read_text()) for p in (out / "tune").glob("*.json")}
    assert all("BLEU" not in r and r["dev_loss"] > 0 for r in tune_rows.values())  # dev only
    for cell in ("len1", "len5"):
        best = min((r for r in tune_rows.values() if r["cell"] == cell),
                   key=lambda r: r["dev_loss"])  # fmt: skip
        (run,) = (out / "runs").glob(f"{cell}-*.predictions.json")
        assert run.name == f"{best['run']}.predictions.json"  # the dev-best LR went to test
        row = json.loads((out / "runs" / f"{best['run']}.json").read_text())
        assert row["tuning"]["lr"] == best["lr"] and len(row["tuning"]["lr_grid"]) == 2
        assert row["machine"] and row["versions"]["torch"] and row["wall_seconds"] > 0
        predictions = json.loads(run.read_text())
        assert predictions["items"] == 4 == len(predictions["predictions"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["length"] for r in rows] == ["1", "5"]
    assert all(0 <= float(r["BLEU"]) <= 100 for r in rows)
    assert (out / f"{experiment}.png").stat().st_size > 1000
    text = (out / "results.md").read_text()
    assert "Command: `prefixtune reproduce" in text and "## The claims, tested" in text
    assert "Figure 4: length 5 vs 1" in text and "## Learning rates (chosen on dev)" in text
    capsys.readouterr()
    assert main(argv) == 0  # every run has its result file: nothing is trained again
    assert "train" not in capsys.readouterr().err
    (run,) = (out / "runs").glob("len5-*.predictions.json")
    (out / "runs" / run.name.replace(".predictions", "")).unlink()
    assert main([*argv, "--report-only"]) == 0  # trains nothing, reports the finished run
    assert "1 of 2 runs finished" in (out / "results.md").read_text()
    assert [r["length"] for r in csv.DictReader((out / "results.csv").open())] == ["1"]
    assert main([*argv, "--cells", "len1", "--report-only"]) == 0  # the command names the cells
    assert "--cells len1`" in (out / "results.md").read_text()


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


def test_init_grid_compares_random_and_real_words_with_the_lowdata_protocol():
    cells = init_grid(SCALES["cpu"])
    inits = {c.labels["init"] for c in cells}
    assert "random" in inits and "table-to-text:" in inits and "elephant" in inits
    assert {c.train["train_size"] for c in cells} == {50} and all(c.resample for c in cells)


def test_lowdata_runs_pair_methods_on_the_same_subsamples_apart_from_training_seeds():
    cells = lowdata_grid(SCALES["cpu"])
    tuned = {s.name: {"dev_loss": abs(s.train["lr"] - LR_GRIDS[s.labels["method"]][1])}
             for s in tuning_runs(cells, SCALES["cpu"])}  # fmt: skip  # inner best: no extension
    runs = seed_runs(cells, tuned, SCALES["cpu"])
    pairs = {m: {(s.labels["size"], s.train["subsample_seed"], s.train["seed"]) for s in runs
                 if s.labels["method"] == m} for m in ("prefix", "finetune")}  # fmt: skip
    assert pairs["prefix"] == pairs["finetune"] and len(pairs["prefix"]) == 4 * 3
    assert all(sub != seed for _, sub, seed in pairs["prefix"])
    assert len({sub for _, sub, _ in pairs["prefix"]}) == 3  # a new subsample per pair


needs_xsum = pytest.mark.skipif(not (data_dir() / "xsum").exists(), reason="no XSum data dir")


def test_xsum_grids_compare_prefix_and_finetune_in_the_tldr_format():
    plain, sports = xsum_grid(SCALES["cpu"]), xsum_grid(SCALES["cpu"], sports=True)
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
    table = (tmp_path / "results" / f"xsum-sports-{model_dir.name}" / "results.md").read_text()
    assert "| method | n | % params | % trained | ROUGE_1 | ROUGE_2 | ROUGE_L |" in table
    prefix_row, finetune_row = (line for line in table.split("\n## ")[0].splitlines() if line.startswith("| ") and
                                line.split("|")[1].strip() in ("prefix", "finetune"))  # fmt: skip
    assert "100%" in finetune_row and "100%" not in prefix_row
    runs = tmp_path / "runs" / f"xsum-sports-{model_dir.name}-tiny"
    assert list(runs.glob("prefix-*/eval-sports-test/metrics.json"))
