"""Prediction, reference and category files of any system, read for `metrics.score`.

Formats (UTF-8):
    predictions  one per line; or .jsonl lines with a "prediction" string
    references   one per line, the references of one input separated by a blank line (the
                 official E2E scripts' format; a file with no blank line and as many lines as
                 predictions holds one reference per input); or .jsonl lines with a
                 "references" list (or a "reference" string)
    categories   one per line, seen or unseen (WebNLG); a references .jsonl may carry them in
                 a "category" field instead

`prefixtune evaluate` writes predictions.txt + references.txt and predictions.jsonl, which is
both a predictions and a references file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.data.records import DataError, json_line
from prefixtune.evaluation.metrics import score


@dataclass
class References:
    """The reference lists of a file, and the categories it carried (jsonl), if any."""

    lists: list[list[str]]
    categories: list[str] | None = None


def _text(path: Path, flag: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None


def _lines(text: str) -> list[str]:
    """Lines split at \\n only (a prediction may hold other line separators), without the
    final newline's empty line and without a Windows \\r."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _jsonl(path: Path, flag: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_lines(_text(path, flag)), 1):
        if not line.strip():
            continue
        try:
            rows.append(json_line(path, number, line))  # one JSON object, as data files hold
        except DataError as err:
            raise ConfigError(f"{flag} {err}") from None
    return rows


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise ConfigError(f"{where}: no {key!r} field (have {', '.join(sorted(row)) or 'none'})")
    return row[key]


def read_predictions(path: str | Path) -> list[str]:
    """One prediction per line, or the "prediction" field of each .jsonl line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return _lines(_text(path, "PREDICTIONS"))
    out = []
    for number, row in enumerate(_jsonl(path, "PREDICTIONS"), 1):
        value = _field(row, "prediction", f"PREDICTIONS {path}: row {number}")
        if not isinstance(value, str):
            raise ConfigError(f"PREDICTIONS {path}: row {number}: 'prediction' is not a string")
        out.append(value)
    return out


def _grouped(lines: list[str], items: int | None) -> list[list[str]]:
    """Blank-line-separated groups; no blank line and one line per item: one reference each."""
    if items is not None and len(lines) == items and all(line.strip() for line in lines):
        return [[line] for line in lines]
    groups: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


def _jsonl_references(path: Path) -> References:
    lists, categories = [], []
    for number, row in enumerate(_jsonl(path, "REFERENCES"), 1):
        where = f"REFERENCES {path}: row {number}"
        refs = row["references"] if "references" in row else [_field(row, "reference", where)]
        if isinstance(refs, str) or not isinstance(refs, list):
            raise ConfigError(f"{where}: 'references' must be a list of strings")
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ConfigError(f"{where}: 'references' must be a non-empty list of strings")
        lists.append(list(refs))
        categories.append(row.get("category"))
    carried = categories if categories and all(isinstance(c, str) for c in categories) else None
    return References(lists, carried)


def read_references(path: str | Path, items: int | None = None) -> References:
    """Reference lists from the E2E multi-reference text format or a .jsonl file; `items`
    (the predictions' count) lets a blank-line-free file hold one reference per line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _jsonl_references(path)
    return References(_grouped(_lines(_text(path, "REFERENCES")), items))


def read_categories(path: str | Path) -> list[str]:
    """One category (seen/unseen) per line."""
    path = Path(path)
    lines = _lines(_text(path, "--categories"))
    for number, line in enumerate(lines, 1):
        if line.strip() not in ("seen", "unseen"):
            raise ConfigError(f"--categories {path}:{number}: {line!r} is not seen or unseen")
    return [line.strip() for line in lines]


def _check_count(what: str, path: Path, n: int, predictions: Path, count: int) -> None:
    if n != count:
        raise ConfigError(f"PREDICTIONS {predictions} has {count} predictions but {what} "
                          f"{path} has {n}: give one per prediction")  # fmt: skip


def score_files(task: str, predictions: str | Path, references: str | Path,
                categories: str | Path | None = None, bootstrap: int = 0) -> dict[str, Any]:  # fmt: skip
    """Score the files with `metrics.score`, as `evaluate` does (NaN scores left out);
    returns {"task", "items", "metrics"}. Categories (webnlg) come from `categories`, else
    from a references .jsonl that carries them."""
    predictions, references = Path(predictions), Path(references)
    preds = read_predictions(predictions)
    refs = read_references(references, len(preds))
    _check_count("REFERENCES", references, len(refs.lists), predictions, len(preds))
    labels = None
    if categories is not None:
        if task != "webnlg":
            raise ConfigError(f"--categories is for --task webnlg only, not {task!r}")
        labels = read_categories(categories)
        _check_count("--categories", Path(categories), len(labels), predictions, len(preds))
    elif task == "webnlg":
        labels = refs.categories
    try:
        metrics = score(task, preds, refs.lists, labels, bootstrap=bootstrap)
    except ValueError as err:  # the metrics' input checks, e.g. an item with empty references
        raise ConfigError(f"cannot score {predictions} against {references}: {err}") from None
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    return {"task": task, "items": len(preds), "metrics": metrics}
