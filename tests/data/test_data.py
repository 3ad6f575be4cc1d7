"""Tests for prefixtune.data.encoding / prefixtune.data.readers: readers on fixture files in the real formats,
linearisation, grouping, tokenisation, padding, bucketing, error messages, and counts on the real
data dir (skipped when it is absent)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prefixtune.data import e2e as e2e_reader
from prefixtune.data import webnlg as webnlg_reader
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import (
    IGNORE_INDEX,
    Encoded,
    adds_bos,
    collate,
    collate_seq2seq,
    encode,
    length_bucketed_batches,
    prompt_ids,
)
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


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "data"
    make_e2e(base)
    make_webnlg(base)
    make_dart(base)
    make_xsum(base)
    return base


# ----------------------------------------------------------------------------- tiny tokenizers

CORPUS = [
    "name : Alimentum | area : city centre | family friendly : no",
    "There is a place in the city centre , Alimentum , that is not family - friendly .",
    "| Aarhus_Airport : cityServed : Aarhus | Bakso : country : Indonesia",
    "The quick brown fox jumps over the lazy dog.\n",
]


def tiny_tokenizer(*, bos_first: bool, eos_last: bool = False, pad_is_eos: bool = False):
    """Byte-level BPE (vocab 300) with <pad>=0, <s>=1, </s>=2, built without network."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    single = ("<s> $A" if bos_first else "$A") + (" </s>" if eos_last else "")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    pad = "</s>" if pad_is_eos else "<pad>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad
    )


@pytest.fixture(scope="module")
def tok_plain():  # GPT-2 style: no BOS added by default
    return tiny_tokenizer(bos_first=False)


@pytest.fixture(scope="module")
def tok_bos():  # Llama/SmolLM2 style: BOS first, pad == eos
    return tiny_tokenizer(bos_first=True, pad_is_eos=True)


@pytest.fixture(scope="module")
def tok_s2s():  # BART style: <s> text </s>
    return tiny_tokenizer(bos_first=True, eos_last=True)


def plain_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


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


# ----------------------------------------------------------------------------- encode


EXAMPLES = [
    Example("name : Alimentum | area : city centre", "There is a place in the city centre ."),
    Example("name : Cotto", "Cotto is not family - friendly ."),
]


@pytest.mark.parametrize("tok_name", ["tok_plain", "tok_bos"])
def test_encode_decoder_only(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    assert adds_bos(tok) == (tok_name == "tok_bos")
    encoded, stats = encode(
        EXAMPLES, tok, encoder_decoder=False, max_source_tokens=512, max_target_tokens=512
    )
    assert (stats.n_source_truncated, stats.n_target_truncated, stats.warning()) == (0, 0, None)
    for ex, enc in zip(EXAMPLES, encoded, strict=True):
        prompt = prompt_ids(ex.source, tok)
        bos = [tok.bos_token_id] if tok_name == "tok_bos" else []
        assert prompt == bos + plain_ids(tok, ex.source) + plain_ids(tok, "\n")
        answer = plain_ids(tok, ex.target) + [tok.eos_token_id]
        assert enc.input_ids == prompt + answer
        assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer
        assert tok.decode(enc.input_ids, skip_special_tokens=True) == f"{ex.source}\n{ex.target}"


def test_encode_truncation(tok_bos):
    long = Example("name : Alimentum | area : city centre | family friendly : no", "a " * 40)
    encoded, stats = encode(
        [long, EXAMPLES[1]], tok_bos, encoder_decoder=False, max_source_tokens=6,
        max_target_tokens=5, separator=" |\n",
    )  # fmt: skip
    assert (stats.n_examples, stats.n_source_truncated, stats.n_target_truncated) == (2, 2, 2)
    assert "2 of 2 sources" in stats.warning()
    sep = plain_ids(tok_bos, " |\n")
    for enc in encoded:
        n_prompt = enc.labels.count(IGNORE_INDEX)
        assert n_prompt == 6 and enc.input_ids[0] == tok_bos.bos_token_id
        assert enc.input_ids[n_prompt - len(sep) : n_prompt] == sep  # separator kept
        assert len(enc.input_ids) - n_prompt == 5 and enc.labels[-1] == tok_bos.eos_token_id
    assert (
        prompt_ids(long.source, tok_bos, separator=" |\n", max_source_tokens=6)
        == (encoded[0].input_ids[:6])
    )
    with pytest.raises(ValueError, match="no room"):
        prompt_ids(long.source, tok_bos, separator=" |\n", max_source_tokens=len(sep) + 1)


def test_encode_seq2seq(tok_s2s):
    encoded, stats = encode(
        EXAMPLES, tok_s2s, encoder_decoder=True, max_source_tokens=512, max_target_tokens=512
    )
    assert stats.n_source_truncated == 0
    for ex, enc in zip(EXAMPLES, encoded, strict=True):
        assert enc.input_ids == tok_s2s(ex.source)["input_ids"]
        assert enc.labels == tok_s2s(ex.target)["input_ids"]
        assert enc.labels[0] == tok_s2s.bos_token_id and enc.labels[-1] == tok_s2s.eos_token_id
    encoded, stats = encode(
        EXAMPLES, tok_s2s, encoder_decoder=True, max_source_tokens=4, max_target_tokens=3
    )
    assert (stats.n_source_truncated, stats.n_target_truncated) == (2, 2)
    for enc in encoded:
        assert len(enc.input_ids) == 4 and enc.input_ids[-1] == tok_s2s.eos_token_id
        assert len(enc.labels) == 3 and enc.labels[-1] == tok_s2s.eos_token_id
    batch = collate_seq2seq(encoded + [Encoded([5, 2], [1, 9, 9, 2])], pad_id=0)
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].shape == (3, 4)
    assert batch["labels"][0].tolist()[-1] == IGNORE_INDEX
    assert batch["attention_mask"][2].tolist() == [1, 1, 0, 0]
    assert batch["decoder_attention_mask"][0].tolist() == [1, 1, 1, 0]


def test_encode_requires_eos(tok_plain):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="eos"):
        encode(EXAMPLES, NoEos(), encoder_decoder=False, max_source_tokens=8, max_target_tokens=8)


# ----------------------------------------------------------------------------- collate / batches


def test_collate_pad_equals_eos():
    eos = 2  # pad == eos: the labels must keep the real EOS and mask only the pads
    items = [
        Encoded([1, 5, 6, 7, eos], [-100, -100, 6, 7, eos]),
        Encoded([1, 5, eos], [-100, 5, eos]),
    ]
    right = collate(items, pad_id=eos)
    assert right["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 2, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 5, 2, -100, -100]]
    left = collate(items, pad_id=eos, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6, 7, 2], [2, 2, 1, 5, 2]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, -100, -100, 5, 2]]
    assert all(t.dtype == torch.long for t in left.values())
    with pytest.raises(ValueError, match="padding_side"):
        collate(items, pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="collate_seq2seq"):
        collate([Encoded([1, 2], [3])], pad_id=0)


def padding_of(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_bucketed_batches():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1003)]
    batches = length_bucketed_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert batches == length_bucketed_batches(lengths, 8, seed=1)
    assert batches != length_bucketed_batches(lengths, 8, seed=2)
    order = list(range(1003))
    random.Random(1).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, 1003, 8)]
    assert padding_of(batches, lengths) < 0.2 * padding_of(random_batches, lengths)
    capped = length_bucketed_batches(lengths, 64, seed=1, max_tokens=1000)
    assert sorted(i for b in capped for i in b) == list(range(1003))
    assert all(len(b) * max(lengths[i] for i in b) <= 1000 for b in capped)
    fixed = length_bucketed_batches(lengths, 8, seed=0, shuffle=False)
    flat = [lengths[i] for b in fixed for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert length_bucketed_batches([10, 5000], 4, seed=0, max_tokens=100) in (
        [[1], [0]],
        [[0], [1]],
    )
    assert length_bucketed_batches([], 4, seed=0) == []
    with pytest.raises(ValueError):
        length_bucketed_batches(lengths, 0, seed=0)


# ----------------------------------------------------------------------------- real data

REAL = data_dir()
needs_real = pytest.mark.skipif(not (REAL / "e2e").is_dir(), reason="real data dir absent")


@needs_real
def test_real_e2e_mapping_reproduces_prefixtuning_valid():
    ours = [f"{r.source}||{r.refs[0]} " for r in e2e_reader.e2e_harvard(REAL, "valid")]
    theirs = (REAL / "e2e/prefixtuning/src1_valid.txt").read_text(encoding="utf-8").split("\n")
    assert theirs[-1] == ""
    assert len(ours) == len(theirs) - 1 == 4672
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False), start=1):
        assert a == b, f"line {i}"


@needs_real
def test_real_counts():
    assert len(load_examples("e2e", "train")) == 42_061
    dev = load_examples("e2e", "dev")
    assert len(dev) == 4_672 and len(load_examples("e2e", "dev", grouped=True)) == 547
    assert len(load_examples("e2e", "test")) == 4_693
    assert len(load_examples("e2e", "test", grouped=True)) == 630
    test = load_examples("webnlg", "test", grouped=True)
    assert len(test) == 1_862 and sum(len(e.references) for e in test) == 4_928
    seen = [e.meta["seen"] for e in test]
    assert (seen.count("seen"), seen.count("unseen")) == (971, 891)
    assert len(load_examples("webnlg", "test_unseen", grouped=True)) == 891
    assert len(load_examples("webnlg", "train")) == 18_025  # 18,102 lex minus 77 "toFix"
    assert len(load_examples("dart", "train")) == 62_659
    assert len(load_examples("dart", "test")) == 12_551  # 12,552 refs, one of them empty
    assert [len(load_examples("xsum", s)) for s in ("train", "dev", "test")] == [800, 100, 100]


@needs_real
def test_real_webnlg_dev_matches_prefixtuning_json():
    entries = json.loads((REAL / "webnlg2017/dev.json").read_text(encoding="utf-8"))["entries"]
    ours = list(webnlg_reader.read_webnlg(REAL, "dev"))
    assert len(ours) == len(entries) == 872
    for i, (rec, entry) in enumerate(zip(ours, entries, strict=True)):
        e = entry[str(i + 1)]
        triples = [(t["subject"], t["property"], t["object"]) for t in e["modifiedtripleset"]]
        assert rec.source == linearize_triples(triples)
        assert rec.refs == [lex["lex"].strip() for lex in e["lexicalisations"]]
        assert rec.meta["category"] == e["category"]


def test_jsonl_task_folder_picks_the_split_file(tmp_path):
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text(
            json.dumps({"source": split, "target": "t"}) + "\n"
        )
    assert load_examples(str(tmp_path), "dev")[0].source == "dev"
    with pytest.raises(DataError, match=r"test.jsonl: no such split file.*dev.jsonl"):
        load_examples(str(tmp_path), "test")
