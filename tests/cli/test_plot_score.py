"""`prefixtune plot` (runs' curves to a PNG) and `prefixtune score` (any system's files)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.figure
import pytest

from prefixtune.cli import score as score_cli
from prefixtune.cli.main import main
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.data.builtin import builtin_examples
from prefixtune.evaluation.metrics import TASKS
from prefixtune.evaluation.predictor import evaluate_run
from prefixtune.training.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_log(run: Path, records: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture
def drawn(monkeypatch):
    """What every saved figure showed: [(ylabel, [(label, xs, ys)])] per panel."""
    panels: list = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        for ax in fig.axes:
            lines = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                     for line in ax.get_lines()]  # fmt: skip
            panels.append((ax.get_ylabel(), lines))
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return panels


def test_plot_draws_a_line_per_run_and_metric(tmp_path, drawn, capsys):
    a = _write_log(
        tmp_path / "len5",
        [
            {"step": 0, "dev_loss": 5.0},
            {"step": 1, "loss": 4.0},
            {"step": 2, "loss": 3.0},
            {"step": 2, "dev_loss": 3.5},
        ],
    )
    # a resumed run re-logs step 2: its last line wins
    b = _write_log(
        tmp_path / "len10",
        [
            {"step": 1, "loss": 4.5},
            {"step": 2, "loss": 9.0},
            {"step": 2, "loss": 2.5},
            {"step": 3, "loss": 2.0},
        ],
    )
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left
    assert drawn == [
        ("loss", [("len5", [1, 2], [4.0, 3.0]), ("len10", [1, 2, 3], [4.5, 2.5, 2.0])]),
        ("dev_loss", [("len5", [0, 2], [5.0, 3.5])]),
    ]
    printed = capsys.readouterr().out
    assert "len10  dev_loss: not in its log.jsonl" in printed and f"wrote {out}" in printed


def test_plot_chosen_metrics_and_default_output(tmp_path, drawn):
    run = _write_log(
        tmp_path / "run",
        [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.0, "lr": 5e-4}],
    )
    assert main(["plot", str(run), "--metric", "lr"]) == 0
    assert (run / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert drawn == [("lr", [("run", [1, 2], [1e-3, 5e-4])])]


def test_runs_with_one_name_are_labelled_by_path(tmp_path, drawn):
    first = _write_log(tmp_path / "a" / "run", [{"step": 1, "loss": 1.0}])
    second = _write_log(tmp_path / "b" / "run", [{"step": 1, "loss": 2.0}])
    assert main(["plot", str(first), str(second), "--metric", "loss",
                 "--out", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert [label for label, *_ in drawn[0][1]] == [str(first), str(second)]


def test_plot_errors_name_the_directory_line_or_metric(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty), "--out", str(tmp_path / "p.png")]) == 2
    assert f"{empty}: no log.jsonl here" in capsys.readouterr().err
    bad = _write_log(tmp_path / "bad", [{"step": 1, "loss": 1.0}])
    with open(bad / "log.jsonl", "a") as handle:
        handle.write("{not json\n")
    assert main(["plot", str(bad)]) == 2
    assert f"{bad / 'log.jsonl'}:2: not a JSON line" in capsys.readouterr().err
    good = _write_log(tmp_path / "good", [{"step": 1, "loss": 1.0}])
    assert main(["plot", str(good), "--metric", "bleu"]) == 2
    assert "--metric bleu: no run logged it; the logs hold loss" in capsys.readouterr().err
    assert not (good / "curves.png").exists() and not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------------- score


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, model_dir):
    """A tiny run evaluated on a 5-item JSONL test split (the generic metric suite)."""
    root = tmp_path_factory.mktemp("score")
    for split, n in (("train", 12), ("dev", 6), ("test", 5)):
        rows = [{"source": e.source, "target": e.target} for e in builtin_examples(split)[:n]]
        (root / "task").mkdir(exist_ok=True)
        (root / "task" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(data=str(root / "task"), model=str(model_dir), out=str(root / "run"),
                         max_steps=3, batch_size=4, lr=0.05, progress=False,
                         max_source_tokens=40, max_target_tokens=16)  # fmt: skip
    train(config, PrefixConfig(length=3, mlp_hidden=8))
    from prefixtune.config import GenerateConfig

    report = evaluate_run(root / "run", "test", config=GenerateConfig(max_new_tokens=6),
                          bootstrap=50, out=root / "eval", progress=False)  # fmt: skip
    return root / "eval", report


def test_score_of_evaluate_outputs_equals_evaluate(evaluated, tmp_path):
    out, report = evaluated
    assert set(report["metrics"]) >= {"BLEU", "ROUGE_L", "BLEU_ci_low"}
    for predictions, references in (("predictions.txt", "references.txt"),
                                    ("predictions.jsonl", "predictions.jsonl")):  # fmt: skip
        scores = tmp_path / f"{predictions}.json"
        assert main(["score", "--task", "generic", str(out / predictions), str(out / references),
                     "--bootstrap", "50", "--out", str(scores)]) == 0  # fmt: skip
        written = json.loads(scores.read_text())
        assert written["metrics"] == report["metrics"], predictions  # exactly
        assert written["items"] == report["items"] == 5


def test_score_refuses_mismatched_counts_naming_both_files(evaluated, tmp_path, capsys):
    out, _ = evaluated
    short = tmp_path / "short.txt"
    short.write_text("".join((out / "predictions.txt").read_text().splitlines(True)[:3]))
    assert main(["score", "--task", "generic", str(short), str(out / "references.txt")]) == 2
    err = capsys.readouterr().err
    assert (
        f"PREDICTIONS {short} has 3 predictions but REFERENCES {out / 'references.txt'} has 5"
        in err
    )
    assert err.count("\n") == 1


def test_score_task_choices_are_the_metrics_tasks():
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    (task,) = [a for a in parser._actions if a.dest == "task"]
    assert tuple(task.choices) == TASKS
