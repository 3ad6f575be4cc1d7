"""E2E (the cleaned Harvard CSV layout or the prefix-tuning repo's text files)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from prefixtune.data.records import DataError, Record, linearize_table, read_lines


def _harvard_source(line: str, where: str) -> str:
    """``__start_name__ X __end_name__ ...`` -> ``name : X | ...`` (PrefixTuning's keys)."""
    slots = _E2E_SLOT.findall(line)
    rebuilt = " ".join(f"__start_{k}__ {v} __end_{k}__" for k, v in slots)
    if not slots or rebuilt != line.strip():
        raise DataError(f"{where}: not a harvardnlp E2E meaning representation: {line[:80]!r}")
    for key, _ in slots:
        if key not in _E2E_KEYS:
            raise DataError(f"{where}: unknown E2E attribute {key!r}")
    return linearize_table((_E2E_KEYS[k], v.strip()) for k, v in slots)


def e2e_harvard(root: Path, split: str) -> Iterator[Record]:
    base = root / "e2e" / "harvardnlp_e2e_aligned"
    src_path, tgt_path = base / f"src_{split}.txt.gz", base / f"{split}.txt.gz"
    srcs, tgts = read_lines(src_path, root), read_lines(tgt_path, root)
    if len(srcs) != len(tgts):
        raise DataError(f"{src_path} has {len(srcs)} lines but {tgt_path} has {len(tgts)}")
    for i, (src, tgt) in enumerate(zip(srcs, tgts, strict=True), start=1):
        source = _harvard_source(src, f"{src_path}:{i}")
        text, eos, _ = tgt.partition(" <eos>")
        if not eos:
            raise DataError(f"{tgt_path}:{i}: no ' <eos>' after the reference")
        if not text.strip():
            raise DataError(f"{tgt_path}:{i}: empty reference")
        yield Record(source, [text.strip()], {})


def _e2e_prefixtuning(root: Path, name: str) -> Iterator[Record]:
    path = root / "e2e" / "prefixtuning" / name
    for i, line in enumerate(read_lines(path, root), start=1):
        parts = line.split("||")
        if len(parts) != 2:
            raise DataError(f"{path}:{i}: expected '<table>||<reference>', got {line[:80]!r}")
        source, target = parts[0].strip(), parts[1].strip()
        if not source or not target:
            raise DataError(f"{path}:{i}: empty {'source' if not source else 'reference'}")
        yield Record(source, [target], {})


def read_e2e(root: Path, split: str) -> Iterator[Record]:
    if split == "train":
        return e2e_harvard(root, "train")
    return _e2e_prefixtuning(root, "src1_valid.txt" if split == "dev" else "src1_test.txt")


_E2E_KEYS = {
    "name": "name",
    "eatType": "Type",
    "priceRange": "price",
    "customerrating": "customer rating",
    "familyFriendly": "family friendly",
    "food": "food",
    "area": "area",
    "near": "near",
}


_E2E_SLOT = re.compile(r"__start_(\w+?)__ (.*?) __end_\1__")
