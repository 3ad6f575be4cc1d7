"""Dataset readers: E2E, WebNLG 2017, DART, XSum (our split), generic JSONL and a built-in toy set.

Every reader yields *records* (one source with its references); :func:`load_examples` turns them
into :class:`Example` objects, one per reference (training) or one per distinct source (evaluation).
Paths are relative to :func:`data_dir` (see ``/work/shared/data/README.md`` for the formats).
Sources and targets are stripped of surrounding whitespace. Bad input raises one
:class:`DataError` naming the file (and line or entry) instead of a deep traceback.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DATASETS = ("e2e", "webnlg", "dart", "xsum")
BUILTIN = "builtin"  # the generated toy set of builtin_examples(), also accepted by load_examples
SPLITS: Mapping[str, tuple[str, ...]] = {
    "e2e": ("train", "dev", "test"),
    "webnlg": ("train", "dev", "test", "test_seen", "test_unseen"),
    "dart": ("train", "dev", "test"),
    "xsum": ("train", "dev", "test", "news-train", "news-dev", "sports-test"),
    BUILTIN: ("train", "dev", "test"),
}
# The 10 WebNLG 2017 training categories; test entries of any other category are "unseen".
WEBNLG_SEEN_CATEGORIES = frozenset((
    "Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
    "SportsTeam", "University", "WrittenWork",
))  # fmt: skip
XSUM_SPORT_CUES = ("BBC Sport", "Media playback is not supported")
# Sport vocabulary for docs without a known BBC section. Three or more hits in the summary plus
# the first 1,500 characters marks a sport doc: on the 321 docs whose section is known (the docs
# the threshold was chosen on, so in-sample) that is precision 0.87 / recall 0.92 (the two cues
# above alone: recall ~0.3). Words like "win" or "club" also occur in other news.
XSUM_SPORT_WORDS = re.compile(
    r"\b(football|league|cup|match|goals?|striker|midfielder|defender|goalkeeper|premiership|"
    r"championship|tournament|olympics?|athlete|cricket|rugby|tennis|golf|boxing|f1|grand prix|"
    r"wicket|innings|semi-final|quarter-final|final|manager|coach|season|squad|players?|club|"
    r"win|won|victory|defeat|scored|title|medal|race|champion)\b"
)
XSUM_SPORT_MIN_WORDS = 3
_ENV = "PREFIXTUNE_DATA"


class DataError(ValueError):
    """A data file is missing or malformed, or a dataset/split name is unknown."""


@dataclass(frozen=True)
class Example:
    """One source with one training target (and, for evaluation, all its references)."""

    source: str
    target: str
    references: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass
class _Record:
    source: str
    refs: list[str]  # the targets; one training Example each
    meta: dict[str, str]
    references: tuple[str, ...] | None = None  # explicit evaluation references (JSONL only)


# ----------------------------------------------------------------------------- locations


def data_dir() -> Path:
    """The data folder: ``$PREFIXTUNE_DATA``, else ``../shared/data`` next to cwd or the repo."""
    env = os.environ.get(_ENV)
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


def _missing(path: Path, root: Path) -> DataError:
    return DataError(
        f"data file not found: {path} (data dir: {root}; set {_ENV} to the folder that holds "
        "e2e/, webnlg2017/, dart/ and xsum/)"
    )


def _read_text(path: Path, root: Path | None = None) -> str:
    """Whole file as text (``.gz`` transparently), errors as DataError."""
    if not path.is_file():
        raise _missing(path, root if root is not None else path.parent)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from None


def _lines(path: Path, root: Path | None = None) -> list[str]:
    """Lines without line endings; a final newline does not make an extra empty line."""
    lines = _read_text(path, root).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _text_field(obj: Mapping, key: str, where: str, *, allow_empty: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value and not allow_empty:
        raise DataError(f"{where}: field {key!r} is empty")
    return value


# ----------------------------------------------------------------------------- linearisation


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


# ----------------------------------------------------------------------------- E2E

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


def _e2e_harvard(root: Path, split: str) -> Iterator[_Record]:
    base = root / "e2e" / "harvardnlp_e2e_aligned"
    src_path, tgt_path = base / f"src_{split}.txt.gz", base / f"{split}.txt.gz"
    srcs, tgts = _lines(src_path, root), _lines(tgt_path, root)
    if len(srcs) != len(tgts):
        raise DataError(f"{src_path} has {len(srcs)} lines but {tgt_path} has {len(tgts)}")
    for i, (src, tgt) in enumerate(zip(srcs, tgts, strict=True), start=1):
        source = _harvard_source(src, f"{src_path}:{i}")
        text, eos, _ = tgt.partition(" <eos>")
        if not eos:
            raise DataError(f"{tgt_path}:{i}: no ' <eos>' after the reference")
        if not text.strip():
            raise DataError(f"{tgt_path}:{i}: empty reference")
        yield _Record(source, [text.strip()], {})


def _e2e_prefixtuning(root: Path, name: str) -> Iterator[_Record]:
    path = root / "e2e" / "prefixtuning" / name
    for i, line in enumerate(_lines(path, root), start=1):
        parts = line.split("||")
        if len(parts) != 2:
            raise DataError(f"{path}:{i}: expected '<table>||<reference>', got {line[:80]!r}")
        source, target = parts[0].strip(), parts[1].strip()
        if not source or not target:
            raise DataError(f"{path}:{i}: empty {'source' if not source else 'reference'}")
        yield _Record(source, [target], {})


def _read_e2e(root: Path, split: str) -> Iterator[_Record]:
    if split == "train":
        return _e2e_harvard(root, "train")
    return _e2e_prefixtuning(root, "src1_valid.txt" if split == "dev" else "src1_test.txt")


# ----------------------------------------------------------------------------- WebNLG 2017


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
            f"set {_ENV} to the folder that holds webnlg2017/)"
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


def _webnlg_entry(entry: ET.Element, path: Path, good_only: bool) -> _Record | None:
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
    return _Record(linearize_triples(triples), refs, meta)


def _read_webnlg(root: Path, split: str) -> Iterator[_Record]:
    """Train keeps only lexicalisations with ``comment="good"`` (as PrefixTuning trained); others all."""
    good_only = split == "train"
    want = {"test_seen": "seen", "test_unseen": "unseen"}.get(split)
    for path in _webnlg_files(root, split):
        if not path.is_file():
            raise _missing(path, root)
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


# ----------------------------------------------------------------------------- DART


def _dart_source(tripleset: object, where: str) -> str:
    if not isinstance(tripleset, list) or not tripleset:
        raise DataError(f"{where}: 'tripleset' must be a non-empty list of [s, p, o]")
    for t in tripleset:
        if not (isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)):
            raise DataError(f"{where}: malformed triple {t!r} (expected 3 strings)")
    return linearize_triples(tripleset, style="dart")


def _dart_flat(root: Path, path: Path) -> Iterator[_Record]:
    """ConvLab-3 flat file: one reference a line (empty texts are skipped)."""
    for i, line in enumerate(_lines(path, root), start=1):
        where = f"{path}:{i}"
        obj = _json_line(path, i, line)
        source = _dart_source(obj.get("tripleset"), where)
        text = _text_field(obj, "text", where, allow_empty=True)
        if text:
            yield _Record(source, [text], {"annotation_source": str(obj.get("source", ""))})


def _dart_json(root: Path, path: Path) -> Iterator[_Record]:
    """Official json layout: a list of entries; empty annotation texts (1 in test) are skipped."""
    try:
        data = json.loads(_read_text(path, root))
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
        refs = [_text_field(a, "text", where, allow_empty=True) for a in anns]
        if any(refs):
            meta = {"annotation_source": str(anns[0].get("source", ""))}
            yield _Record(source, [r for r in refs if r], meta)


def _read_dart(root: Path, split: str) -> Iterator[_Record]:
    base = root / "dart"
    if split == "train":
        return _dart_flat(root, base / "convlab3_2022-05" / "dart-v1.1.1-train.flat.jsonl.gz")
    if split == "dev":
        return _dart_json(root, base / "prefixtuning_2020-07" / "dart-v1.1.1-full-dev.json")
    return _dart_json(root, base / "convlab3_2022-05" / "dart-v1.1.1-full-test.rebuilt.json.gz")


# ----------------------------------------------------------------------------- XSum


def _xsum_sections(root: Path) -> dict[str, str]:
    path = root / "xsum" / "test_urls_sections_pr31.jsonl.gz"
    if not path.is_file():
        return {}
    out = {}
    for i, line in enumerate(_lines(path, root), start=1):
        obj = _json_line(path, i, line)
        if "id" in obj and isinstance(obj.get("section"), str):
            out[str(obj["id"])] = obj["section"]
    return out


def xsum_split_of(ids: Sequence[str]) -> dict[str, str]:
    """OUR split of the available XSum docs (not the official one): ids ranked by SHA-256 of
    ``"xsum:<id>"``; the first 10% are dev, the next 10% test, the rest train (800/100/100)."""
    ranked = sorted(ids, key=lambda x: hashlib.sha256(f"xsum:{x}".encode()).hexdigest())
    n_eval = len(ranked) // 10
    return {
        x: "dev" if r < n_eval else "test" if r < 2 * n_eval else "train"
        for r, x in enumerate(ranked)
    }


def _read_xsum(root: Path, split: str) -> Iterator[_Record]:
    """Only 1,000 official *test* documents exist here; train/dev/test are carved from them by
    :func:`xsum_split_of`. Meta: ``id``, ``sport_cue`` ("1"/"0": a text heuristic, see XSUM_SPORT_WORDS) and
    ``section`` (BBC URL section, only for the ids in the PR #31 URL file)."""
    path = root / "xsum" / "test_subset1000_davidfanzz.jsonl.gz"
    rows = []
    for i, line in enumerate(_lines(path, root), start=1):
        where = f"{path}:{i}"
        obj = _json_line(path, i, line)
        if "id" not in obj:
            raise DataError(f"{where}: missing field 'id'")
        rows.append(
            (
                str(obj["id"]),
                _text_field(obj, "document", where),
                _text_field(obj, "summary", where),
            )
        )
    split_of = xsum_split_of([r[0] for r in rows])
    sections = _xsum_sections(root)
    for doc_id, document, summary in rows:
        cue = _sport_cue(document, summary)
        meta = {"id": doc_id, "sport_cue": "1" if cue else "0"}
        if doc_id in sections:
            meta["section"] = sections[doc_id]
        if _in_xsum_split(split, split_of[doc_id], _is_sport(meta)):
            yield _Record(document, [summary], meta)


def _sport_cue(document: str, summary: str) -> bool:
    if any(c in document for c in XSUM_SPORT_CUES):
        return True
    text = f"{summary} {document[:1500]}".lower()
    return len(XSUM_SPORT_WORDS.findall(text)) >= XSUM_SPORT_MIN_WORDS


def _is_sport(meta: Mapping[str, str]) -> bool:
    """The BBC URL section where known (sport/...), else the text heuristic (_sport_cue)."""
    if "section" in meta:
        return meta["section"].startswith("sport")
    return meta["sport_cue"] == "1"


def _in_xsum_split(split: str, base: str, sport: bool) -> bool:
    """train/dev/test, or the news-to-sports extrapolation splits: news-train and news-dev (the
    non-sport docs of train/dev) and sports-test (every sport doc, whatever its base split)."""
    if split == "sports-test":
        return sport
    if split in ("news-train", "news-dev"):
        return not sport and base == split.removeprefix("news-")
    return base == split


# ----------------------------------------------------------------------------- generic JSONL


def _read_jsonl(path: Path) -> Iterator[_Record]:
    """Lines ``{"source", "target"[, "references": [...]][, "meta": {...}]}``; blank lines skipped."""
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        obj = _json_line(path, i, line)
        source, target = _text_field(obj, "source", where), _text_field(obj, "target", where)
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
        yield _Record(source, [target], {str(k): str(v) for k, v in meta.items()}, refs)


# ----------------------------------------------------------------------------- built-in toy set

_NAMES = (
    "The Golden Fork", "Blue Lantern", "The Olive Tree", "Green Man", "The Copper Kettle",
    "Riverside Grill", "The Wrestlers", "Cotto", "The Punter", "Aromi", "The Mill", "Loch Fyne",
    "The Cricketers", "Bibimbap House", "Clowns", "Fitzbillies", "Giraffe", "Midsummer House",
)  # fmt: skip
_NEARS = ("Café Rouge", "The Bakers", "Burger King", "Crowne Plaza Hotel", "The Portland Arms")
_TYPES = ("restaurant", "pub", "coffee shop")
_FOODS = ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food")
_PRICES = ("cheap", "moderate", "high", "less than £ 20", "£ 20 - 25", "more than £ 30")
_RATINGS = ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5")
_BUILTIN_SIZES = {"train": 200, "dev": 40, "test": 40}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _toy_mr(rng: random.Random) -> dict[str, str]:
    slots = {
        "Type": _TYPES,
        "food": _FOODS,
        "price": _PRICES,
        "customer rating": _RATINGS,
        "area": ("city centre", "riverside"),
        "family friendly": ("yes", "no"),
        "near": _NEARS,
    }
    keys = rng.sample(list(slots), rng.randint(2, 5))
    mr = {"name": rng.choice(_NAMES)}
    mr.update({k: rng.choice(v) for k, v in slots.items() if k in keys})
    return mr


def _toy_text(mr: Mapping[str, str], rng: random.Random) -> str:
    """An E2E-style (tokenised) description of ``mr``; ``rng`` picks one of two sentence shapes."""
    noun = " ".join(x for x in (mr.get("food"), mr.get("Type", "place")) if x)
    first = f"{mr['name']} is {_article(noun)} {noun}"
    if "area" in mr:
        first += f" in the {mr['area']} area"
    if "near" in mr:
        first += f" near {mr['near']}"
    rest = []
    if "price" in mr:
        p = mr["price"]
        rest.append(f"has {p} prices" if p in ("cheap", "moderate", "high") else f"costs {p}")
    if "customer rating" in mr:
        r = mr["customer rating"]
        rest.append(f"is rated {r}" if "out of" in r else f"has {_article(r)} {r} customer rating")
    if "family friendly" in mr:
        rest.append(("is" if mr["family friendly"] == "yes" else "is not") + " family - friendly")
    if not rest:
        return f"{first} ."
    tail = rest[0] if len(rest) == 1 else f"{' , '.join(rest[:-1])} and {rest[-1]}"
    return f"{first} . It {tail} ." if rng.random() < 0.5 else f"{first} , which {tail} ."


@functools.cache
def _builtin_all() -> dict[str, tuple[Example, ...]]:
    taken: set[str] = set()
    out = {}
    for split, size in _BUILTIN_SIZES.items():
        rng = random.Random(f"prefixtune-builtin-{split}")
        examples: list[Example] = []
        while len(examples) < size:
            mr = _toy_mr(rng)
            source = linearize_table(mr)
            if source in taken:
                continue
            taken.add(source)
            text = _toy_text(mr, rng)
            examples.append(Example(source, text, (text,), {"id": f"{split}-{len(examples)}"}))
        out[split] = tuple(examples)
    return out


def builtin_examples(split: str) -> list[Example]:
    """A small generated E2E-style set (200 train / 40 dev / 40 test restaurant MRs, one reference
    each, disjoint sources across splits), for demos and tests when the data dir is absent."""
    _check_split(BUILTIN, split)
    return list(_builtin_all()[split])


# ----------------------------------------------------------------------------- public entry points

_READERS: dict[str, Callable[[Path, str], Iterator[_Record]]] = {
    "e2e": _read_e2e,
    "webnlg": _read_webnlg,
    "dart": _read_dart,
    "xsum": _read_xsum,
}


def _check_split(dataset: str, split: str) -> None:
    valid = SPLITS[dataset]
    if split not in valid:
        raise DataError(f"unknown split {split!r} for {dataset}; valid: {', '.join(valid)}")


def _records(dataset: str | Path, split: str, root: Path | None) -> Iterable[_Record]:
    name = str(dataset)
    if name in _READERS:
        _check_split(name, split)
        base = Path(root) if root is not None else data_dir()
        if not base.is_dir():
            raise DataError(
                f"data dir not found: {base} (set {_ENV} to the folder that holds "
                "e2e/, webnlg2017/, dart/ and xsum/)"
            )
        return list(_READERS[name](base, split))
    if name == BUILTIN:
        return [_Record(e.source, [e.target], dict(e.meta)) for e in builtin_examples(split)]
    path = Path(name).expanduser()
    if path.is_dir():  # a task folder: train.jsonl, dev.jsonl, test.jsonl
        split_file = path / f"{split}.jsonl"
        if not split_file.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            raise DataError(f"{split_file}: no such split file (the folder has {found})")
        return list(_read_jsonl(split_file))
    if name.endswith((".jsonl", ".jsonl.gz")) or path.is_file():
        if split not in ("train", "dev", "test"):
            raise DataError(f"unknown split {split!r}; valid: train, dev, test")
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return list(_read_jsonl(path))
    raise DataError(
        f"unknown dataset {name!r}; valid: {', '.join((*DATASETS, BUILTIN))} "
        "or a path to a .jsonl file"
    )


def _group(records: Iterable[_Record]) -> list[Example]:
    """One Example per distinct source (first-appearance order), references concatenated."""
    groups: dict[str, list[_Record]] = {}
    for rec in records:
        groups.setdefault(rec.source, []).append(rec)
    out = []
    for source, recs in groups.items():
        explicit = next((r.references for r in recs if r.references), None)
        refs = explicit or tuple(ref for r in recs for ref in r.refs)
        out.append(Example(source, refs[0], refs, recs[0].meta))
    return out


def load_examples(
    dataset: str | Path, split: str, *, grouped: bool = False, root: Path | None = None
) -> list[Example]:
    """Read ``split`` of ``dataset`` (a name in DATASETS, ``"builtin"``, or a ``.jsonl`` path).

    ``grouped=False``: one Example per reference (``references`` left empty, except JSONL lines
    that carry their own). ``grouped=True``: one Example per distinct source, all references in
    ``references`` and ``target`` = the first (for JSONL, the first line's explicit
    ``references`` win over the collected targets). The ``split`` of a JSONL path is not used
    beyond validation: the file is the split. A folder with ``train.jsonl``, ``dev.jsonl`` and
    ``test.jsonl`` picks the file by split.
    """
    records = _records(dataset, split, root)
    if grouped:
        return _group(records)
    return [Example(r.source, t, r.references or (), r.meta) for r in records for t in r.refs]


def subsample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with ``random.Random(seed)``, in original order."""
    if not 0 <= n <= len(examples):
        raise DataError(f"cannot subsample {n} examples from {len(examples)}")
    picked = random.Random(seed).sample(range(len(examples)), n)
    return [examples[i] for i in sorted(picked)]
