"""Fixture files in the real dataset formats (E2E, WebNLG, DART, XSum), written to a temp dir."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------- fixture writers


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


HARVARD_SRC = [
    "__start_name__ Alimentum __end_name__ __start_area__ city centre __end_area__ "
    "__start_familyFriendly__ no __end_familyFriendly__",
    "__start_name__ The Vaults __end_name__ __start_eatType__ pub __end_eatType__ "
    "__start_priceRange__ more than £ 30 __end_priceRange__ __start_customerrating__ 5 out of 5 "
    "__end_customerrating__ __start_near__ Café Adriatic __end_near__",
    "__start_name__ Alimentum __end_name__ __start_area__ city centre __end_area__ "
    "__start_familyFriendly__ no __end_familyFriendly__",
]
HARVARD_TGT = [
    "There is a place in the city centre , Alimentum , that is not family - friendly . <eos>|||6,8,5",
    "The Vaults pub near Café Adriatic has a 5 star rating . <eos>|||0,2,0 2,3,1",
    "Alimentum is not a family - friendly place . <eos>|||0,1,0",
]
SRC1 = (
    "name : Blue Spice | Type : coffee shop | area : city centre||A coffee shop called Blue Spice . \n"
    "name : Blue Spice | Type : coffee shop | area : city centre||Blue Spice is a coffee shop . \n"
    "name : Cotto | area : riverside||Cotto is in the riverside . \n"
)


def make_e2e(root: Path) -> None:
    base = root / "e2e"
    write(base / "harvardnlp_e2e_aligned/src_train.txt.gz", "\n".join(HARVARD_SRC) + "\n")
    write(base / "harvardnlp_e2e_aligned/train.txt.gz", "\n".join(HARVARD_TGT) + "\n")
    write(base / "prefixtuning/src1_valid.txt", SRC1)
    write(base / "prefixtuning/src1_test.txt", SRC1)


def webnlg_entry(category: str, eid: int, triples: list[str], lexes: list[tuple[str, str]]) -> str:
    mt = "".join(f"<mtriple>{t}</mtriple>" for t in triples)
    lx = "".join(f'<lex comment="{c}" lid="Id{i}">{t}</lex>' for i, (c, t) in enumerate(lexes))
    return (
        f'<entry category="{category}" eid="Id{eid}" size="{len(triples)}">\n'
        f"<originaltripleset><otriple>x | y | z</otriple></originaltripleset>\n"
        f"<modifiedtripleset>{mt}</modifiedtripleset>\n{lx}\n</entry>\n"
    )


def webnlg_xml(entries: list[str]) -> str:
    return (
        "<?xml version='1.0' encoding='UTF-8'?>\n<benchmark><entries>\n"
        + "".join(entries)
        + ("</entries></benchmark>\n")
    )


def make_webnlg(root: Path) -> None:
    base = root / "webnlg2017"
    t1 = webnlg_entry(
        "Airport",
        1,
        ["Aarhus_Airport | cityServed | &quot;Aarhus, Denmark&quot;"],
        [("good", "Aarhus Airport serves Aarhus, Denmark."), ("toFix", "aarhus airport serve")],
    )
    t2 = webnlg_entry("Airport", 2, ["A | b | C"], [("toFix", "only a bad one")])
    t3 = webnlg_entry(
        "Food",
        1,
        ["Bakso | country | Indonesia", "Bakso | ingredient | Noodle"],
        [("good", "Bakso is a noodle dish from Indonesia.")],
    )
    t4 = webnlg_entry(  # same triples as t1 in another file: grouped together
        "Airport",
        1,
        ["Aarhus_Airport | cityServed | &quot;Aarhus, Denmark&quot;"],
        [("good", "Aarhus, Denmark is served by Aarhus Airport.")],
    )
    write(base / "train/1triples/a_Airport.xml", webnlg_xml([t1, t2]))
    write(base / "train/2triples/b_Food.xml", webnlg_xml([t3]))
    write(base / "train/10triples/c_Airport.xml", webnlg_xml([t4]))  # sorts after 2triples
    write(base / "dev/1triples/a.xml", webnlg_xml([t1]))
    test = [
        webnlg_entry("Airport", 1, ["A | p | B"], [("good", "A p B."), ("good", "B is p of A.")]),
        webnlg_entry("Artist", 2, ["C | q | D"], [("good", "C q D.")]),
        webnlg_entry("Food", 3, ["E | r | F"], [("good", "E r F.")]),
    ]
    write(base / "test/testdata_with_lex.xml", webnlg_xml(test))


DART_ENTRIES = [
    {
        "tripleset": [
            ["Mars Hill College", "JOINED", "1973"],
            ["Mars Hill College", "LOCATION", "NC"],
        ],
        "annotations": [
            {"source": "WikiSQL_decl_sents", "text": "A school from NC joined in 1973."},
            {"source": "WikiSQL_decl_sents", "text": " It joined in 1973. "},
        ],
    },
    {
        "tripleset": [["reserved", "CLOCK_RATE_(HZ)", "8000"]],
        "subtree_was_extended": False,
        "annotations": [
            {"source": "WikiTableQuestions_lily", "text": "reserved has 8000 Hz clock rate"},
            {"source": "WikiTableQuestions_lily", "text": ""},
        ],
    },
]


def make_dart(root: Path) -> None:
    base = root / "dart"
    flat = [
        {"tripleset": e["tripleset"], "source": a["source"], "text": a["text"]}
        for e in DART_ENTRIES
        for a in e["annotations"]
    ]
    write(base / "convlab3_2022-05/dart-v1.1.1-train.flat.jsonl.gz", jsonl(flat))
    write(base / "prefixtuning_2020-07/dart-v1.1.1-full-dev.json", json.dumps(DART_ENTRIES))
    write(
        base / "convlab3_2022-05/dart-v1.1.1-full-test.rebuilt.json.gz",
        json.dumps(DART_ENTRIES, indent=1),
    )


def make_xsum(root: Path, n: int = 20) -> list[dict]:
    rows = []
    for i in range(n):
        doc = f"Document number {i}." + (" Media playback is not supported." if i % 5 == 0 else "")
        doc += {11: " The striker scored as the club won.", 12: " The club won."}.get(i, "")
        rows.append({"document": doc, "summary": f"Summary {i}.", "id": 1000 + i})
    write(root / "xsum/test_subset1000_davidfanzz.jsonl.gz", jsonl(rows))
    sections = [
        {"id": "1003", "section": "sport/football", "url": "u"},
        {"id": "999", "section": "x"},
    ]
    write(root / "xsum/test_urls_sections_pr31.jsonl.gz", jsonl(sections))
    return rows


@pytest.fixture(name="root")
def root_fixture(tmp_path: Path) -> Path:
    """A data dir holding every dataset's fixture files (the `root` fixture)."""
    base = tmp_path / "data"
    make_e2e(base)
    make_webnlg(base)
    make_dart(base)
    make_xsum(base)
    return base
