"""Dataset readers: E2E, WebNLG 2017, DART, XSum (our split), generic JSONL and a built-in toy set.

Every reader yields *records* (one source with its references); :func:`load_examples` turns them
into :class:`Example` objects, one per reference (training) or one per distinct source (evaluation).
Paths are relative to :func:`data_dir` (see ``/work/shared/data/README.md`` for the formats).
Sources and targets are stripped of surrounding whitespace. Bad input raises one
:class:`DataError` naming the file (and line or entry) instead of a deep traceback.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prefixtune.data.builtin import builtin_examples
from prefixtune.data.dart import read_dart
from prefixtune.data.e2e import read_e2e
from prefixtune.data.hf_datasets import FieldMap, hf_examples, hf_stream, is_hf_input
from prefixtune.data.jsonl import read_jsonl
from prefixtune.data.records import (
    BUILTIN,
    DATA_ENV,
    DATASETS,
    DataError,
    Example,
    Record,
    check_split,
    data_dir,
)
from prefixtune.data.webnlg import read_webnlg
from prefixtune.data.xsum import read_xsum

_READERS: dict[str, Callable[[Path, str], Iterator[Record]]] = {
    "e2e": read_e2e,
    "webnlg": read_webnlg,
    "dart": read_dart,
    "xsum": read_xsum,
}


def _records(dataset: str | Path, split: str, root: Path | None) -> Iterable[Record]:
    name = str(dataset)
    if name in _READERS:
        check_split(name, split)
        base = Path(root) if root is not None else data_dir()
        if not base.is_dir():
            raise DataError(
                f"data dir not found: {base} (set {DATA_ENV} to the folder that holds "
                "e2e/, webnlg2017/, dart/ and xsum/)"
            )
        return list(_READERS[name](base, split))
    if name == BUILTIN:
        return [Record(e.source, [e.target], dict(e.meta)) for e in builtin_examples(split)]
    path = Path(name).expanduser()
    if path.is_dir():  # a task folder: train.jsonl, dev.jsonl, test.jsonl
        split_file = path / f"{split}.jsonl"
        if not split_file.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            raise DataError(f"{split_file}: no such split file (the folder has {found})")
        return list(read_jsonl(split_file))
    if name.endswith((".jsonl", ".jsonl.gz")) or path.is_file():
        if split not in ("train", "dev", "test"):
            raise DataError(f"unknown split {split!r}; valid: train, dev, test")
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return list(read_jsonl(path))
    raise DataError(
        f"unknown dataset {name!r}; valid: {', '.join((*DATASETS, BUILTIN))} "
        "or a path to a .jsonl/.parquet/.csv/.json/.arrow file, a folder of them, a "
        "save_to_disk folder, or a hub id (hf:owner/name)"
    )


def _group(records: Iterable[Record]) -> list[Example]:
    """One Example per distinct source (first-appearance order), references concatenated.

    A chat conversation is never merged with another: it stays one Example, messages kept.
    """
    groups: dict[object, list[Record]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(("chat", i) if rec.messages else rec.source, []).append(rec)
    out = []
    for recs in groups.values():
        explicit = next((r.references for r in recs if r.references), None)
        refs = explicit or tuple(ref for r in recs for ref in r.refs)
        out.append(Example(recs[0].source, refs[0], refs, recs[0].meta, recs[0].messages))
    return out


def _hf_input(dataset: str | Path, fields: FieldMap) -> bool:
    name = str(dataset)
    return name not in _READERS and name != BUILTIN and is_hf_input(name, fields)


def load_examples(
    dataset: str | Path,
    split: str,
    *,
    grouped: bool = False,
    root: Path | None = None,
    fields: FieldMap | None = None,
) -> list[Example]:
    """Read ``split`` of ``dataset`` (a name in DATASETS, ``"builtin"``, or a ``.jsonl`` path).

    ``grouped=False``: one Example per reference (``references`` left empty, except JSONL lines
    that carry their own). ``grouped=True``: one Example per distinct source, all references in
    ``references`` and ``target`` = the first (for JSONL, the first line's explicit
    ``references`` win over the collected targets). The ``split`` of a JSONL path is not used
    beyond validation: the file is the split. A folder with ``train.jsonl``, ``dev.jsonl`` and
    ``test.jsonl`` picks the file by split. Parquet/CSV/JSON/Arrow files, their folders,
    ``save_to_disk`` folders and hub ids are read by :mod:`prefixtune.data.hf_datasets` with
    ``fields`` (the columns). Chat conversations are never grouped: one Example each.
    """
    fields = fields or FieldMap()
    if _hf_input(dataset, fields):
        examples = list(hf_examples(str(dataset), split, fields))
        if not grouped:
            return examples
        return _group(
            Record(e.source, [e.target], dict(e.meta), messages=e.messages) for e in examples
        )
    records = _records(dataset, split, root)
    if grouped:
        return _group(records)
    return [Example(r.source, t, r.references or (), r.meta, r.messages)
            for r in records for t in r.refs]  # fmt: skip


def example_stream(
    dataset: str | Path, split: str, fields: FieldMap | None = None
) -> Callable[[], Iterator[Example]]:
    """``split`` as a re-readable stream of training Examples: each call reads from the start.

    `datasets` inputs (and .jsonl files) are read lazily, never held whole; the named datasets
    and the builtin set are small and read into memory.
    """
    fields = fields or FieldMap()
    name = str(dataset)
    path = Path(name).expanduser()
    if (
        name.endswith((".jsonl", ".jsonl.gz"))
        and path.is_file()
        or (path.is_dir() and any(path.glob("*.jsonl")))
    ):  # JSONL files and task folders: streamed through `datasets` too
        return hf_stream(name, split, fields, jsonl=True)
    if _hf_input(name, fields):
        return hf_stream(name, split, fields)
    examples = load_examples(dataset, split, fields=fields)
    return lambda: iter(examples)


def subsample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with ``random.Random(seed)``, in original order."""
    if not 0 <= n <= len(examples):
        raise DataError(f"cannot subsample {n} examples from {len(examples)}")
    picked = random.Random(seed).sample(range(len(examples)), n)
    return [examples[i] for i in sorted(picked)]
