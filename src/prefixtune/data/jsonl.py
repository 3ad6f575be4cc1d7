"""Generic JSONL: one {"source", "target"} object a line (optional "references", "meta"), or
a chat conversation {"messages": [{"role", "content"}, ...]} (optional "meta"; see chat.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prefixtune.data.chat import chat_example
from prefixtune.data.records import DataError, Record, json_line, read_lines, text_field


def read_jsonl(path: Path) -> Iterator[Record]:
    """Lines ``{"source", "target"[, "references": [...]][, "meta": {...}]}`` or
    ``{"messages": [...][, "meta": {...}]}``; blank lines skipped."""
    for i, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        obj = json_line(path, i, line)
        if "messages" in obj:
            yield _chat_record(obj, path, i)
            continue
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


def _chat_record(obj: dict, path: Path, lineno: int) -> Record:
    """A {"messages": [...]} line; its file and line go into meta (errors name them later)."""
    where = f"{path} line {lineno}"
    extra = sorted(set(obj) - {"messages", "meta"})
    if extra:
        raise DataError(f"{where}: a 'messages' line takes no {', '.join(map(repr, extra))} "
                        "(give either source/target or messages)")  # fmt: skip
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'meta' must be an object")
    meta = {**{str(k): str(v) for k, v in meta.items()}, "file": str(path), "line": str(lineno)}
    example = chat_example(obj["messages"], where, meta)
    return Record(example.source, [example.target], dict(example.meta), None, example.messages)
