"""Hugging Face ``datasets`` inputs: files, folders, ``save_to_disk`` folders and hub ids.

What ``--data`` may name here (:func:`is_hf_input` decides):

- a ``.parquet``, ``.csv``, ``.json`` or ``.arrow`` file: the file is the split asked;
- a folder of such files: the split's files by name (``train*``; ``dev*``, ``validation*``,
  ``valid*`` or ``val*`` for dev; ``test*``), e.g. ``train.parquet`` or
  ``data/train-00000-of-00002.parquet``;
- a ``save_to_disk`` folder (``dataset_dict.json``: its splits; ``dataset_info.json``: one
  Dataset, the split asked);
- a hub id, ``hf:owner/name`` or ``owner/name`` (``datasets.load_dataset``; offline it fails
  with a DataError naming the id and ``HF_DATASETS_OFFLINE``).

``.jsonl`` files and folders stay with :mod:`prefixtune.data.jsonl` unless a field mapping other
than source/target is given. Files are always read through ``datasets``' IterableDataset (no
cache copy, bounded memory). Rows become Examples by a :class:`FieldMap`: a source column and a
target column (a string, or a list of references: one Example each), or a column of chat
conversations (:func:`prefixtune.data.chat.chat_example`; with the default fields, a row with
``messages`` and no ``source`` is one, as in JSONL). Errors name the file, the row
(0-based, as ``dataset[i]``) and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixtune.data.chat import chat_example
from prefixtune.data.records import DataError, Example

FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}
JSONL = {".jsonl": "json"}  # read here only with a field mapping (else data/jsonl.py)
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json")
SPLIT_NAMES = {"dev": ("dev", "validation", "valid", "val")}
HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class FieldMap:
    """Which columns hold the source, the target (or references), or chat messages."""

    source: str = "source"
    target: str = "target"
    messages: str = ""

    @property
    def is_default(self) -> bool:
        return self == FieldMap()


@dataclass(frozen=True)
class Part:
    """One file (or split of a dataset): ``where`` names it in errors, ``rows()`` reads it
    from the start, each call anew."""

    where: str
    rows: Callable[[], Iterable[Mapping[str, Any]]]


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def _formats(fields: FieldMap, jsonl: bool = False) -> dict[str, str]:
    return FORMATS if fields.is_default and not jsonl else {**FORMATS, **JSONL}


def is_hf_input(name: str, fields: FieldMap = FieldMap()) -> bool:
    """True when ``--data`` names something this module reads (see the module docstring)."""
    if name.startswith(HUB_PREFIX):
        return True
    path = Path(name).expanduser()
    formats = _formats(fields)
    if path.is_file():
        return _suffix(path) in formats
    if path.is_dir():
        if any((path / m).is_file() for m in SAVED_MARKERS):
            return True
        return any(_suffix(p) in formats for p in path.rglob("*") if p.is_file())
    if _suffix(path) in formats:
        return True  # a missing file: this reader says so
    return _suffix(path) not in (".jsonl", ".gz") and bool(_HUB_ID.match(name))


def _split_aliases(split: str) -> tuple[str, ...]:
    return SPLIT_NAMES.get(split, (split,))


def _matches(path: Path, aliases: tuple[str, ...]) -> bool:
    stem = path.name.lower().split(".")[0]
    return any(stem == a or re.match(rf"{re.escape(a)}[-_]", stem) for a in aliases)


def _file_part(path: Path, fmt: str) -> Part:
    def rows() -> Iterable[Mapping[str, Any]]:
        import datasets  # heavy: imported when a file is read

        try:
            return datasets.load_dataset(fmt, data_files=[str(path)], split="train",
                                         streaming=True)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - any reader failure names the file
            raise DataError(f"{path}: cannot read as {fmt} ({exc})") from None

    return Part(str(path), rows)


def _folder_parts(folder: Path, split: str, formats: dict[str, str]) -> list[Part]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _suffix(p) in formats)
    aliases = _split_aliases(split)
    chosen = [p for p in files if _matches(p, aliases)]
    if not chosen:
        names = [str(p.relative_to(folder)) for p in files]
        raise DataError(f"{folder}: no {split} files (looked for {', '.join(a + '.*' for a in aliases)}"
                        f"; the folder has {names})")  # fmt: skip
    return [_file_part(p, formats[_suffix(p)]) for p in chosen]


def _pick_split(splits: Mapping[str, Any], split: str, where: str) -> tuple[str, Any]:
    for alias in _split_aliases(split):
        if alias in splits:
            return alias, splits[alias]
    raise DataError(f"{where}: no split {split!r} (it has {', '.join(splits)})")


def _saved_parts(folder: Path, split: str) -> list[Part]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{folder}: cannot load the saved dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        name, ds = _pick_split(loaded, split, str(folder))
        return [Part(f"{folder} [{name}]", lambda: ds)]
    return [Part(str(folder), lambda: loaded)]  # one Dataset: the split asked


def _hub_parts(name: str, split: str, streaming: bool) -> list[Part]:
    import datasets

    repo = name.removeprefix(HUB_PREFIX)
    try:
        loaded = datasets.load_dataset(repo, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no access: one message
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise DataError(
            f"{name}: not a local file or folder, and the Hugging Face hub dataset {repo!r} "
            f"could not be loaded ({type(exc).__name__}: {exc}). HF_DATASETS_OFFLINE="
            f"{offline or 'unset'}: where the hub is reachable, load it once and save_to_disk "
            "it, then pass that folder to --data"
        ) from None
    if isinstance(loaded, Mapping):
        key, ds = _pick_split(loaded, split, f"hub dataset {repo}")
        return [Part(f"{repo} [{key}]", lambda: ds)]
    return [Part(repo, lambda: loaded)]


def open_split(name: str, split: str, fields: FieldMap = FieldMap(), *, streaming: bool = False,
               jsonl: bool = False) -> list[Part]:  # fmt: skip
    """The parts (files, or a dataset's split) that hold ``split`` of ``name``, in order.

    ``jsonl=True`` reads .jsonl files here even with the default fields (streaming them).
    """
    path = Path(name).expanduser()
    formats = _formats(fields, jsonl)
    if name.startswith(HUB_PREFIX) or not path.exists():
        if _suffix(path) in formats:
            raise DataError(f"data file not found: {path}")
        return _hub_parts(name, split, streaming)
    if path.is_file():
        if _suffix(path) not in formats:
            raise DataError(f"{path}: not a file this reader knows ({', '.join(formats)})")
        return [_file_part(path, formats[_suffix(path)])]
    if any((path / m).is_file() for m in SAVED_MARKERS):
        return _saved_parts(path, split)
    return _folder_parts(path, split, formats)


def _value(row: Mapping[str, Any], key: str, where: str, flag: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: field {key!r} is missing (columns: {', '.join(map(str, row))}"
                        f"; choose one with {flag})")  # fmt: skip
    value = row[key]
    if value is None:
        raise DataError(f"{where}: field {key!r} is missing (null)")
    return value


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is not a string (got {type(value).__name__})")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value.strip()


def row_examples(row: Mapping[str, Any], where: str, fields: FieldMap) -> list[Example]:
    """A row's training Examples: one per reference, or one chat Example."""
    chat = fields.messages or (  # default fields: a JSONL-style {"messages": [...]} row
        "messages" if fields.is_default and row.get("source") is None and row.get("messages")
        else ""
    )  # fmt: skip
    if chat:
        messages = _value(row, chat, where, "--messages-field")
        return [chat_example(messages, where)]
    source = _text(_value(row, fields.source, where, "--source-field"), fields.source, where)
    target = _value(row, fields.target, where, "--target-field")
    if isinstance(target, str):
        return [Example(source, _text(target, fields.target, where))]
    if not isinstance(target, (list, tuple)) or not target:
        raise DataError(f"{where}: field {fields.target!r} is not a string or a non-empty list "
                        f"of strings (got {type(target).__name__})")  # fmt: skip
    return [Example(source, _text(t, f"{fields.target}[{i}]", where))
            for i, t in enumerate(target)]  # fmt: skip


def part_examples(parts: list[Part], fields: FieldMap) -> Iterator[Example]:
    """Every part's rows as training Examples, in order, read lazily."""
    for part in parts:
        for i, row in enumerate(part.rows()):
            yield from row_examples(row, f"{part.where} row {i}", fields)


def hf_examples(name: str, split: str, fields: FieldMap = FieldMap(), *,
                streaming: bool = False) -> Iterator[Example]:  # fmt: skip
    """``split`` of ``name`` as training Examples (one per reference), read lazily."""
    return part_examples(open_split(name, split, fields, streaming=streaming), fields)


def hf_stream(name: str, split: str, fields: FieldMap = FieldMap(), *,
              jsonl: bool = False) -> Callable[[], Iterator[Example]]:  # fmt: skip
    """A re-readable stream of ``split``: each call reads it from the start, never all at once."""
    parts = open_split(name, split, fields, streaming=True, jsonl=jsonl)
    return lambda: part_examples(parts, fields)
