"""WebNLG 2017 (XML): triples linearised the paper's way, seen/unseen categories."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from prefixtune.data.records import DATA_ENV, DataError, Record, linearize_triples, missing_file

# The 10 WebNLG 2017 training categories; test entries of any other category are "unseen".
WEBNLG_SEEN_CATEGORIES = frozenset((
    "Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
    "SportsTeam", "University", "WrittenWork",
))  # fmt: skip


def _xml_where(path: Path, eid: str) -> str:
    """``file:line (entry eid=..)``; the line is found by searching the raw file."""
    needle = f'eid="{eid}"'
    try:
        for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if needle in line:
                return f"{path}:{i} (entry eid={eid})"
    except (OSError, UnicodeDecodeError):
        pass
    return f"{path} (entry eid={eid})"


def _webnlg_files(root: Path, split: str) -> list[Path]:
    base = root / "webnlg2017"
    if split.startswith("test"):
        return [base / "test" / "testdata_with_lex.xml"]
    folder = base / split
    files = sorted(
        folder.glob("*triples/*.xml"),
        key=lambda p: (int(re.match(r"\d*", p.parent.name).group() or 0), p.name),
    )
    if not files:
        raise DataError(
            f"no WebNLG XML files found under {folder}/<N>triples/ (data dir: {root}; "
            f"set {DATA_ENV} to the folder that holds webnlg2017/)"
        )
    return files


def _split_mtriple(text: str | None, where: Callable[[], str]) -> tuple[str, str, str]:
    parts = [p.strip() for p in (text or "").split(" | ")]
    if len(parts) != 3 or not all(parts):
        raise DataError(f"{where()}: malformed <mtriple> {text!r} (expected 's | p | o')")
    return parts[0], parts[1], parts[2]


def _lex_text(lex: ET.Element) -> str:
    child = lex.find("text")  # later WebNLG releases nest the text
    return ((child.text if child is not None else lex.text) or "").strip()


def _webnlg_entry(entry: ET.Element, path: Path, good_only: bool) -> Record | None:
    eid = entry.get("eid", "?")

    def where() -> str:
        return _xml_where(path, eid)

    category = entry.get("category")
    if not category:
        raise DataError(f"{where()}: entry without a category attribute")
    mtriples = entry.findall("modifiedtripleset/mtriple")
    if not mtriples:
        raise DataError(f"{where()}: entry has no <modifiedtripleset>/<mtriple>")
    triples = [_split_mtriple(m.text, where) for m in mtriples]
    lexes = entry.findall("lex")
    if not lexes:
        raise DataError(f"{where()}: entry has no <lex> reference")
    refs = []
    for lex in lexes:
        text = _lex_text(lex)
        if not text:
            raise DataError(f"{where()}: empty <lex> (lid={lex.get('lid', '?')})")
        if not good_only or lex.get("comment") == "good":
            refs.append(text)
    if not refs:
        return None
    seen = "seen" if category in WEBNLG_SEEN_CATEGORIES else "unseen"
    meta = {"category": category, "seen": seen, "eid": eid, "size": str(len(triples))}
    return Record(linearize_triples(triples), refs, meta)


def read_webnlg(root: Path, split: str) -> Iterator[Record]:
    """Train keeps only lexicalisations with ``comment="good"`` (as PrefixTuning trained); others all."""
    good_only = split == "train"
    want = {"test_seen": "seen", "test_unseen": "unseen"}.get(split)
    for path in _webnlg_files(root, split):
        if not path.is_file():
            raise missing_file(path, root)
        try:
            tree = ET.parse(path)
        except ET.ParseError as exc:
            raise DataError(f"{path}:{exc.position[0]}: malformed XML ({exc})") from None
        entries = list(tree.getroot().iter("entry"))
        if not entries:
            raise DataError(f"{path}: no <entry> elements")
        for entry in entries:
            rec = _webnlg_entry(entry, path, good_only)
            if rec is not None and (want is None or rec.meta["seen"] == want):
                yield rec
