"""Generic JSONL: one {"source", "target"} object a line (optional "references", "meta")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prefixtune.data.records import DataError, Record, json_line, read_lines, text_field


def read_jsonl(path: Path) -> Iterator[Record]:
    """Lines ``{"source", "target"[, "references": [...]][, "meta": {...}]}``; blank lines skipped."""
    for i, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        obj = json_line(path, i, line)
        source, target = text_field(obj, "source", where), text_field(obj, "target", where)
        refs = obj.get("references")
        if refs is not None:
            if not isinstance(refs, list) or not all(
                isinstance(r, str) and r.strip() for r in refs
            ):
                raise DataError(f"{where}: 'references' must be a list of non-empty strings")
            refs = tuple(r.strip() for r in refs) or None
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"{where}: 'meta' must be an object")
        yield Record(source, [target], {str(k): str(v) for k, v in meta.items()}, refs)
