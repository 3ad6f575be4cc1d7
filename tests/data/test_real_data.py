"""Counts and mappings on the real data dir (../shared/data; skipped when it is absent), and the
JSONL task-folder layout."""

from __future__ import annotations

import json

import pytest

from prefixtune.data import e2e as e2e_reader
from prefixtune.data import webnlg as webnlg_reader
from prefixtune.data.readers import load_examples
from prefixtune.data.records import (
    DataError,
    data_dir,
    linearize_triples,
)

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
