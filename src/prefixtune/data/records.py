"""What every reader shares: the Example and record types, DataError, the data folder, and
line/field checks that name the file and line."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DATA_ENV = "PREFIXTUNE_DATA"


class DataError(ValueError):
    """A data file is missing or malformed, or a dataset/split name is unknown."""


@dataclass(frozen=True)
class Example:
    """One source with one training target (and, for evaluation, all its references)."""

    source: str
    target: str
    references: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    messages: tuple[Mapping[str, str], ...] = field(default=(), hash=False)
    """A chat conversation ({"role", "content"} dicts); empty for source/target examples."""


@dataclass
class Record:
    source: str
    refs: list[str]  # the targets; one training Example each
    meta: dict[str, str]
    references: tuple[str, ...] | None = None  # explicit evaluation references (JSONL only)
    messages: tuple[Mapping[str, str], ...] = ()  # a chat conversation (JSONL "messages" lines)


def data_dir() -> Path:
    """The data folder: ``$PREFIXTUNE_DATA``, else ``../shared/data`` next to cwd or the repo."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [
        Path.cwd() / ".." / "shared" / "data",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data",
    ]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return candidates[0]


def missing_file(path: Path, root: Path) -> DataError:
    return DataError(
        f"data file not found: {path} (data dir: {root}; set {DATA_ENV} to the folder that holds "
        "e2e/, webnlg2017/, dart/ and xsum/)"
    )


def read_text(path: Path, root: Path | None = None) -> str:
    """Whole file as text (``.gz`` transparently), errors as DataError."""
    if not path.is_file():
        raise missing_file(path, root if root is not None else path.parent)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from None


def read_lines(path: Path, root: Path | None = None) -> list[str]:
    """Lines without line endings; a final newline does not make an extra empty line."""
    lines = read_text(path, root).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def text_field(obj: Mapping, key: str, where: str, *, allow_empty: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value and not allow_empty:
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def linearize_table(pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """E2E linearisation: ``name : The Eagle | Type : coffee shop | area : riverside``."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return " | ".join(f"{k} : {v}" for k, v in items)


def linearize_triples(triples: Iterable[Sequence[str]], *, style: str = "webnlg") -> str:
    """Triples as PrefixTuning linearised them (entities verbatim, underscores and quotes kept).

    ``style="webnlg"``: ``| s : p : o | s2 : p2 : o2`` (a bar before every triple).
    ``style="dart"``: ``s : p : o | s2 : p2 : o2`` with the relation lowercased.
    """
    if style not in ("webnlg", "dart"):
        raise ValueError(f"unknown triple style {style!r}; use 'webnlg' or 'dart'")
    parts = []
    for s, p, o in triples:
        parts.append(f"{s} : {p.lower() if style == 'dart' else p} : {o}")
    joined = " | ".join(parts)
    return f"| {joined}" if style == "webnlg" and parts else joined


DATASETS = ("e2e", "webnlg", "dart", "xsum")


BUILTIN = "builtin"  # the generated toy set of builtin_examples(), also accepted by load_examples


SPLITS: Mapping[str, tuple[str, ...]] = {
    "e2e": ("train", "dev", "test"),
    "webnlg": ("train", "dev", "test", "test_seen", "test_unseen"),
    "dart": ("train", "dev", "test"),
    "xsum": ("train", "dev", "test", "news-train", "news-dev", "sports-test"),
    BUILTIN: ("train", "dev", "test"),
}


def check_split(dataset: str, split: str) -> None:
    valid = SPLITS[dataset]
    if split not in valid:
        raise DataError(f"unknown split {split!r} for {dataset}; valid: {', '.join(valid)}")
