"""DART (JSON or the flat prefix-tuning files): triple sets with grouped references."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from prefixtune.data.records import (
    DataError,
    Record,
    json_line,
    linearize_triples,
    read_lines,
    read_text,
    text_field,
)


def _dart_source(tripleset: object, where: str) -> str:
    if not isinstance(tripleset, list) or not tripleset:
        raise DataError(f"{where}: 'tripleset' must be a non-empty list of [s, p, o]")
    for t in tripleset:
        if not (isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)):
            raise DataError(f"{where}: malformed triple {t!r} (expected 3 strings)")
    return linearize_triples(tripleset, style="dart")


def _dart_flat(root: Path, path: Path) -> Iterator[Record]:
    """ConvLab-3 flat file: one reference a line (empty texts are skipped)."""
    for i, line in enumerate(read_lines(path, root), start=1):
        where = f"{path}:{i}"
        obj = json_line(path, i, line)
        source = _dart_source(obj.get("tripleset"), where)
        text = text_field(obj, "text", where, allow_empty=True)
        if text:
            yield Record(source, [text], {"annotation_source": str(obj.get("source", ""))})


def _dart_json(root: Path, path: Path) -> Iterator[Record]:
    """Official json layout: a list of entries; empty annotation texts (1 in test) are skipped."""
    try:
        data = json.loads(read_text(path, root))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of DART entries")
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object")
        source = _dart_source(entry.get("tripleset"), where)
        anns = entry.get("annotations")
        if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise DataError(f"{where}: 'annotations' must be a list of objects")
        refs = [text_field(a, "text", where, allow_empty=True) for a in anns]
        if any(refs):
            meta = {"annotation_source": str(anns[0].get("source", ""))}
            yield Record(source, [r for r in refs if r], meta)


def read_dart(root: Path, split: str) -> Iterator[Record]:
    base = root / "dart"
    if split == "train":
        return _dart_flat(root, base / "convlab3_2022-05" / "dart-v1.1.1-train.flat.jsonl.gz")
    if split == "dev":
        return _dart_json(root, base / "prefixtuning_2020-07" / "dart-v1.1.1-full-dev.json")
    return _dart_json(root, base / "convlab3_2022-05" / "dart-v1.1.1-full-test.rebuilt.json.gz")
