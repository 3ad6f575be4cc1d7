"""Readers on fixture files in the real formats: linearisation, grouping, splits, subsampling,
the built-in set, and one clear error per bad file, row or field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixtune.data.builtin import builtin_examples
from prefixtune.data.readers import load_examples, subsample
from prefixtune.data.records import (
    DATASETS,
    SPLITS,
    DataError,
    Example,
    data_dir,
    linearize_table,
    linearize_triples,
)
from prefixtune.data.xsum import xsum_split_of

from data_fixtures import (  # root_fixture: the `root` fixture
    HARVARD_SRC,
    HARVARD_TGT,
    SRC1,
    jsonl,
    root_fixture,  # noqa: F401
    webnlg_entry,
    webnlg_xml,
    write,
)

# ----------------------------------------------------------------------------- linearisation


def test_linearize_table_and_triples():
    assert (
        linearize_table({"name": "Cotto", "area": "riverside"}) == "name : Cotto | area : riverside"
    )
    assert linearize_table([("name", "A"), ("Type", "pub")]) == "name : A | Type : pub"
    triples = [("Aarhus_Airport", "cityServed", '"Aarhus"'), ("A", "leaderName", "B_C")]
    assert (
        linearize_triples(triples)
        == '| Aarhus_Airport : cityServed : "Aarhus" | A : leaderName : B_C'
    )
    assert linearize_triples(triples, style="dart") == (
        'Aarhus_Airport : cityserved : "Aarhus" | A : leadername : B_C'
    )
    with pytest.raises(ValueError, match="style"):
        linearize_triples(triples, style="nope")


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("PREFIXTUNE_DATA")
    monkeypatch.chdir(tmp_path)
    assert isinstance(data_dir(), Path)


# ----------------------------------------------------------------------------- readers


def test_e2e_reader(root):
    train = load_examples("e2e", "train", root=root)
    assert [e.source for e in train] == [
        "name : Alimentum | area : city centre | family friendly : no",
        "name : The Vaults | Type : pub | price : more than £ 30 | customer rating : 5 out of 5"
        " | near : Café Adriatic",
        "name : Alimentum | area : city centre | family friendly : no",
    ]
    assert train[1].target == "The Vaults pub near Café Adriatic has a 5 star rating ."
    assert all(e.references == () for e in train)
    grouped = load_examples("e2e", "train", grouped=True, root=root)
    assert len(grouped) == 2
    assert grouped[0].references == (train[0].target, train[2].target)
    assert grouped[0].target == train[0].target
    dev = load_examples("e2e", "dev", root=root)
    assert len(dev) == 3 and dev[0].target == "A coffee shop called Blue Spice ."
    test = load_examples("e2e", "test", grouped=True, root=root)
    assert [len(e.references) for e in test] == [2, 1]
    assert test[0].source == "name : Blue Spice | Type : coffee shop | area : city centre"


def test_webnlg_reader(root):
    train = load_examples("webnlg", "train", root=root)
    # toFix lexicalisations are dropped in train, an entry left without references disappears
    assert [e.target for e in train] == [
        "Aarhus Airport serves Aarhus, Denmark.",
        "Bakso is a noodle dish from Indonesia.",
        "Aarhus, Denmark is served by Aarhus Airport.",
    ]
    assert train[0].source == '| Aarhus_Airport : cityServed : "Aarhus, Denmark"'
    assert train[1].source == "| Bakso : country : Indonesia | Bakso : ingredient : Noodle"
    assert dict(train[1].meta) == {"category": "Food", "seen": "seen", "eid": "Id1", "size": "2"}
    grouped = load_examples("webnlg", "train", grouped=True, root=root)
    assert len(grouped) == 2 and len(grouped[0].references) == 2
    dev = load_examples("webnlg", "dev", root=root)
    assert len(dev) == 2  # dev keeps every lexicalisation
    test = load_examples("webnlg", "test", grouped=True, root=root)
    assert [e.meta["seen"] for e in test] == ["seen", "unseen", "seen"]
    assert test[0].references == ("A p B.", "B is p of A.")
    seen = load_examples("webnlg", "test_seen", grouped=True, root=root)
    unseen = load_examples("webnlg", "test_unseen", root=root)
    assert [e.meta["category"] for e in seen] == ["Airport", "Food"]
    assert [e.source for e in unseen] == ["| C : q : D"]


def test_dart_reader(root):
    train = load_examples("dart", "train", root=root)
    assert len(train) == 3  # the empty reference is skipped
    assert train[0].source == (
        "Mars Hill College : joined : 1973 | Mars Hill College : location : NC"
    )
    assert train[1].target == "It joined in 1973."
    assert train[0].meta["annotation_source"] == "WikiSQL_decl_sents"
    for split in ("dev", "test"):
        grouped = load_examples("dart", split, grouped=True, root=root)
        assert [len(e.references) for e in grouped] == [2, 1]
        assert grouped[1].source == "reserved : clock_rate_(hz) : 8000"
        assert len(load_examples("dart", split, root=root)) == 3


def test_xsum_reader(root):
    splits = {s: load_examples("xsum", s, root=root) for s in ("train", "dev", "test")}
    assert [len(v) for v in splits.values()] == [16, 2, 2]
    ids = [e.meta["id"] for v in splits.values() for e in v]
    assert sorted(ids) == [str(1000 + i) for i in range(20)]
    assert splits == {s: load_examples("xsum", s, root=root) for s in splits}  # deterministic
    every = {e.meta["id"]: e for v in splits.values() for e in v}
    assert every["1005"].meta["sport_cue"] == "1" and every["1001"].meta["sport_cue"] == "0"
    assert every["1003"].meta["section"] == "sport/football"
    assert "section" not in every["1004"].meta
    assert every["1007"].source == "Document number 7." and every["1007"].target == "Summary 7."
    counts = list(xsum_split_of([str(i) for i in range(1000)]).values())
    assert (counts.count("train"), counts.count("dev"), counts.count("test")) == (800, 100, 100)


def test_xsum_news_to_sports_splits(root):
    ids = {s: {e.meta["id"] for e in load_examples("xsum", s, root=root)} for s in SPLITS["xsum"]}
    # sport: the two text cues (every 5th doc), a known sport/ section (1003), >= 3 sport words
    # (1011: striker, scored, club, won); 1012 has only two (club, won)
    sport = {"1000", "1005", "1010", "1015", "1003", "1011"}
    assert ids["sports-test"] == sport
    assert ids["news-train"] == ids["train"] - sport and ids["news-dev"] == ids["dev"] - sport


def test_jsonl_reader(tmp_path):
    path = write(
        tmp_path / "my.jsonl",
        jsonl(
            [
                {"source": "a", "target": "x "},
                {"source": "b", "target": "y", "meta": {"k": 1}},
                {"source": "a", "target": "z"},
            ]
        )
        + "\n",
    )
    flat = load_examples(str(path), "train")
    assert [(e.source, e.target) for e in flat] == [("a", "x"), ("b", "y"), ("a", "z")]
    assert flat[1].meta == {"k": "1"}
    grouped = load_examples(path, "test", grouped=True)
    assert [e.references for e in grouped] == [("x", "z"), ("y",)]
    path2 = write(
        tmp_path / "refs.jsonl", jsonl([{"source": "a", "target": "x", "references": ["x", "w"]}])
    )
    assert load_examples(path2, "test")[0].references == ("x", "w")
    assert load_examples(path2, "test", grouped=True)[0].references == ("x", "w")


def test_subsample_deterministic():
    examples = [Example(f"s{i}", f"t{i}") for i in range(100)]
    a, b = subsample(examples, 10, seed=3), subsample(examples, 10, seed=3)
    assert a == b and len(set(a)) == 10
    assert subsample(examples, 10, seed=4) != a
    assert [examples.index(e) for e in a] == sorted(examples.index(e) for e in a)
    assert subsample(examples, 100, seed=0) == examples
    with pytest.raises(ValueError, match="cannot subsample 101 examples from 100"):
        subsample(examples, 101, seed=0)


def test_builtin_examples():
    train, dev, test = (builtin_examples(s) for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (200, 40, 40)
    assert train == builtin_examples("train")
    sources = [{e.source for e in split} for split in (train, dev, test)]
    assert sum(map(len, sources)) == 280  # distinct within and across splits
    assert all(e.source.startswith("name : ") and " : " in e.source for e in train)
    assert all(e.target.endswith(" .") and e.references == (e.target,) for e in train)
    assert load_examples("builtin", "dev", grouped=True) == [
        Example(e.source, e.target, (e.target,), e.meta) for e in dev
    ]


# ----------------------------------------------------------------------------- errors


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_error_missing(tmp_path, root):
    msg = error_of(load_examples, "e2e", "dev", root=tmp_path)
    assert "src1_valid.txt" in msg and "PREFIXTUNE_DATA" in msg
    msg = error_of(load_examples, "xsum", "dev", root=tmp_path / "nowhere")
    assert "nowhere" in msg and "PREFIXTUNE_DATA" in msg
    msg = error_of(load_examples, "webnlg", "train", root=tmp_path)
    assert "triples" in msg and "PREFIXTUNE_DATA" in msg
    assert "missing.jsonl" in error_of(load_examples, str(tmp_path / "missing.jsonl"), "train")
    assert "unknown dataset" in error_of(load_examples, "e2f", "valid")
    assert "unknown split 'valid'" in error_of(load_examples, str(tmp_path / "x.jsonl"), "valid")


def test_error_names(root):
    msg = error_of(load_examples, "e2f", "train", root=root)
    assert all(name in msg for name in DATASETS) and ".jsonl" in msg
    msg = error_of(load_examples, "webnlg", "valid", root=root)
    assert "'valid'" in msg and "test_unseen" in msg
    assert error_of(load_examples, "e2e", "test_seen", root=root).endswith(
        "valid: train, dev, test"
    )
    assert "train" in error_of(builtin_examples, "validation")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"source": "a", "target": "b"', "malformed JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"source": "a"}', "missing field 'target'"),
        ('{"source": "a", "target": "  "}', "field 'target' is empty"),
        ('{"source": "", "target": "b"}', "field 'source' is empty"),
        ('{"source": 3, "target": "b"}', "must be a string"),
        ('{"source": "a", "target": "b", "references": ["", "c"]}', "references"),
        ('{"source": "a", "target": "b", "meta": [1]}', "'meta' must be an object"),
    ],
)
def test_error_jsonl_rows(tmp_path, line, expected):
    path = write(tmp_path / "bad.jsonl", '{"source": "ok", "target": "fine"}\n' + line + "\n")
    msg = error_of(load_examples, str(path), "train")
    assert f"{path}:2" in msg and expected in msg


def test_error_e2e_rows(root):
    path = root / "e2e/prefixtuning/src1_test.txt"
    write(path, SRC1 + "name : A | area : riverside\n")
    assert f"{path}:4" in error_of(load_examples, "e2e", "test", root=root)
    write(path, SRC1 + "name : A||   \n")
    assert "empty reference" in error_of(load_examples, "e2e", "test", root=root)
    src = root / "e2e/harvardnlp_e2e_aligned/src_train.txt.gz"
    write(src, "\n".join(HARVARD_SRC[:2]) + "\n")
    assert "has 2 lines but" in error_of(load_examples, "e2e", "train", root=root)
    write(src, "\n".join([*HARVARD_SRC[:2], "__start_name__ X __end_nam__"]) + "\n")
    assert f"{src}:3" in error_of(load_examples, "e2e", "train", root=root)
    write(src, "\n".join([*HARVARD_SRC[:2], "__start_cuisine__ X __end_cuisine__"]) + "\n")
    assert "unknown E2E attribute 'cuisine'" in error_of(load_examples, "e2e", "train", root=root)
    tgt = root / "e2e/harvardnlp_e2e_aligned/train.txt.gz"
    write(src, "\n".join(HARVARD_SRC) + "\n")
    write(tgt, "\n".join([*HARVARD_TGT[:2], "no eos marker"]) + "\n")
    assert f"{tgt}:3" in error_of(load_examples, "e2e", "train", root=root)


def test_error_webnlg(root):
    path = root / "webnlg2017/test/testdata_with_lex.xml"
    write(path, webnlg_xml([webnlg_entry("Airport", 1, ["A | b | C"], [("good", "x")])])[:-20])
    assert f"{path}:" in error_of(load_examples, "webnlg", "test", root=root)
    write(path, webnlg_xml([webnlg_entry("Airport", 7, ["A | b"], [("good", "x")])]))
    msg = error_of(load_examples, "webnlg", "test", root=root)
    assert f"{path}:3 (entry eid=Id7)" in msg and "mtriple" in msg
    write(path, webnlg_xml([webnlg_entry("Airport", 1, ["A | b | C"], [("good", " ")])]))
    assert "empty <lex>" in error_of(load_examples, "webnlg", "test", root=root)
    write(path, webnlg_xml([webnlg_entry("Airport", 1, ["A | b | C"], [])]))
    assert "no <lex>" in error_of(load_examples, "webnlg", "test", root=root)


def test_error_dart_and_xsum(root):
    path = root / "dart/prefixtuning_2020-07/dart-v1.1.1-full-dev.json"
    write(path, json.dumps([{"tripleset": [["a", "b"]], "annotations": []}]))
    msg = error_of(load_examples, "dart", "dev", root=root)
    assert str(path) in msg and "entry 0" in msg and "malformed triple" in msg
    write(path, "[\n{\n")
    assert f"{path}:3: malformed JSON" in error_of(load_examples, "dart", "dev", root=root)
    flat = root / "dart/convlab3_2022-05/dart-v1.1.1-train.flat.jsonl.gz"
    write(flat, jsonl([{"tripleset": [["a", "b", "c"]]}]))
    assert f"{flat}:1: missing field 'text'" in error_of(load_examples, "dart", "train", root=root)
    xs = root / "xsum/test_subset1000_davidfanzz.jsonl.gz"
    write(xs, jsonl([{"id": 1, "document": "d", "summary": "s"}, {"id": 2, "document": "d"}]))
    assert f"{xs}:2: missing field 'summary'" in error_of(load_examples, "xsum", "dev", root=root)
    xs.write_bytes(b"not gzip")  # a corrupt archive: one clear error, not a gzip traceback
    assert "cannot read" in error_of(load_examples, "xsum", "dev", root=root)
