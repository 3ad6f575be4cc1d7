"""Prediction/reference/category files read back for scoring, and evaluate's predictions.jsonl:
the files evaluate writes score exactly as the in-memory lists it scored."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from prefixtune.config import ConfigError
from prefixtune.data.records import Example
from prefixtune.evaluation.metrics import score
from prefixtune.evaluation.predictor import categories_of, write_outputs
from prefixtune.evaluation.score_files import (
    read_categories,
    read_predictions,
    read_references,
    score_files,
)

SOURCES = ["name : Aromi | food : Thai", "name : Bibimbap | area : riverside",
           "name : Cotto | price : cheap", "name : Wildwood | rating : 5 out of 5"]  # fmt: skip
REFERENCES = [
    ("Aromi serves Thai food .", "Thai food is served at Aromi ."),
    ("Bibimbap is by the riverside .",),
    ("Cotto is cheap .", "Cotto has cheap prices .", "A cheap place is Cotto ."),
    ("Wildwood is rated 5 out of 5 .", "Wildwood has a rating of 5 out of 5 ."),
]
PREDICTIONS = ["Aromi serves Thai food .", "Bibimbap is near the river .",
               "Cotto is a cheap place\nto eat .", "Wildwood is rated highly ."]  # fmt: skip
SEEN = ["seen", "unseen", "seen", "unseen"]


@pytest.fixture
def no_java(monkeypatch):
    """METEOR (Java, minutes on a loaded machine) left out on both sides; the E2E test uses it."""
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k)
    )


def _examples(with_categories: bool = False) -> list[Example]:
    return [Example(s, refs[0], refs, {"seen": c} if with_categories else {})
            for s, refs, c in zip(SOURCES, REFERENCES, SEEN, strict=True)]  # fmt: skip


def _expected(task, categories=None, predictions=PREDICTIONS):
    scores = score(task, list(predictions), [list(r) for r in REFERENCES], categories)
    return {k: v for k, v in scores.items() if not (isinstance(v, float) and math.isnan(v))}


def test_predictions_jsonl_holds_each_input_prediction_and_references(tmp_path):
    write_outputs(tmp_path, _examples(True), PREDICTIONS, {"metrics": {}})
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert rows == [
        {"input": s, "prediction": p, "references": list(r), "category": c}
        for s, p, r, c in zip(SOURCES, PREDICTIONS, REFERENCES, SEEN, strict=True)
    ]
    plain = tmp_path / "plain"
    write_outputs(plain, _examples(False), PREDICTIONS, {"metrics": {}})
    first = json.loads((plain / "predictions.jsonl").read_text().splitlines()[0])
    assert "category" not in first
    assert sorted(p.name for p in plain.iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
        "predictions.txt",
        "references.txt",
    ]  # no temp files


@pytest.mark.filterwarnings("ignore:.*(Java|java).*:RuntimeWarning")
@pytest.mark.parametrize("task", ["generic", "xsum", "dart"])
def test_evaluate_files_score_as_the_lists(task, tmp_path, no_java):
    write_outputs(tmp_path, _examples(), PREDICTIONS, {})
    # predictions.txt flattens the newline inside prediction 3, as it always did
    flat = [p.replace("\n", " ") for p in PREDICTIONS]
    txt = score_files(task, tmp_path / "predictions.txt", tmp_path / "references.txt")
    assert txt == {"task": task, "items": 4, "metrics": _expected(task, predictions=flat)}
    exact = score_files(task, tmp_path / "predictions.jsonl", tmp_path / "predictions.jsonl")
    assert exact["metrics"] == _expected(task)


@pytest.mark.filterwarnings("ignore:.*(Java|java).*:RuntimeWarning")
def test_webnlg_categories_from_a_file_or_the_jsonl(tmp_path, no_java):
    examples = _examples(True)
    write_outputs(tmp_path, examples, PREDICTIONS, {})
    expected = _expected("webnlg", categories_of(examples, "webnlg"))
    assert {"BLEU_seen", "BLEU_unseen", "BLEU_all"} <= set(expected)
    from_jsonl = score_files(
        "webnlg", tmp_path / "predictions.jsonl", tmp_path / "predictions.jsonl"
    )
    assert from_jsonl["metrics"] == expected
    (tmp_path / "categories.txt").write_text("\n".join(SEEN) + "\n")
    assert read_categories(tmp_path / "categories.txt") == SEEN
    flat = [p.replace("\n", " ") for p in PREDICTIONS]
    from_file = score_files("webnlg", tmp_path / "predictions.txt", tmp_path / "references.txt",
                            tmp_path / "categories.txt")  # fmt: skip
    assert from_file["metrics"] == _expected("webnlg", SEEN, flat)


@pytest.mark.slow
def test_e2e_official_protocol_from_files(tmp_path):
    write_outputs(tmp_path, _examples(), PREDICTIONS, {})
    exact = score_files("e2e", tmp_path / "predictions.jsonl", tmp_path / "predictions.jsonl")
    assert exact["metrics"] == _expected("e2e") and "CIDEr" in exact["metrics"]


def test_reference_formats(tmp_path):
    grouped = tmp_path / "refs.txt"
    grouped.write_text("a b\nc d\n\n\ne f\r\n\ng\n\n")  # extra blank lines and a CRLF line
    assert read_references(grouped).lists == [["a b", "c d"], ["e f"], ["g"]]
    single = tmp_path / "single.txt"
    single.write_text("one\ntwo\nthree\n")  # no blank line, a line per prediction
    assert read_references(single, items=3).lists == [["one"], ["two"], ["three"]]
    assert read_references(single, items=1).lists == [["one", "two", "three"]]
    rows = tmp_path / "refs.jsonl"
    rows.write_text('{"references": ["x", "y"]}\n{"reference": "z"}\n')
    assert read_references(rows).lists == [["x", "y"], ["z"]]
    assert read_references(rows).categories is None


def test_prediction_formats_keep_empty_lines_and_other_separators(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\nthird\u2028still third\n")
    assert read_predictions(text) == ["first", "", "third\u2028still third"]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prediction": "a\\nb"}\n{"prediction": ""}\n')
    assert read_predictions(rows) == ["a\nb", ""]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("p.jsonl", '{"text": "a"}\n', r"PREDICTIONS .*p.jsonl: row 1: no 'prediction' field \(have text\)"),
    ("p.jsonl", "[1]\n", r"p.jsonl:1: expected a JSON object"),
    ("p.jsonl", "{oops\n", r"PREDICTIONS .*p.jsonl:1: malformed JSON"),
    ("missing.txt", None, r"PREDICTIONS .*missing.txt: file not found"),
])  # fmt: skip
def test_bad_prediction_files_are_named(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_predictions(tmp_path / name)


def test_bad_references_and_categories_are_named(tmp_path):
    preds = tmp_path / "p.txt"
    preds.write_text("a\nb\n")
    refs = tmp_path / "r.jsonl"
    refs.write_text('{"references": "a"}\n{"references": ["b"]}\n')
    with pytest.raises(ConfigError, match=r"r.jsonl: row 1: 'references' must be a list"):
        score_files("generic", preds, refs)
    refs.write_text('{"references": ["a"]}\n{"references": [" "]}\n')
    with pytest.raises(
        ConfigError, match=r"cannot score .*p.txt against .*r.jsonl: item 1 has only"
    ):
        score_files("generic", preds, refs)
    cats = tmp_path / "c.txt"
    cats.write_text("seen\nnew\n")
    with pytest.raises(ConfigError, match=r"--categories .*c.txt:2: 'new' is not seen or unseen"):
        read_categories(cats)
    cats.write_text("seen\n")
    refs.write_text('{"references": ["a"]}\n{"references": ["b"]}\n')
    with pytest.raises(
        ConfigError, match=r"p.txt has 2 predictions but --categories .*c.txt has 1"
    ):
        score_files("webnlg", preds, refs, cats)
    with pytest.raises(ConfigError, match="--categories is for --task webnlg only"):
        score_files("e2e", preds, refs, cats)
