"""Hugging Face `datasets` inputs: Parquet/CSV/JSON files and folders, save_to_disk folders,
hub ids (the offline error only), field mapping, chat columns, errors naming file/row/field,
the CLI flags, and a few training steps on a Parquet file."""

from __future__ import annotations

import argparse
import json

import datasets
import pandas as pd
import pytest
import torch

from prefixtune.cli.train import add_arguments, configs_from_args
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.data.hf_datasets import FieldMap, is_hf_input
from prefixtune.data.readers import example_stream, load_examples
from prefixtune.data.records import DataError, Example
from prefixtune.training.prepare import load_data
from prefixtune.training.trainer import train

from conftest import TOKENIZER_VOCAB, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

QA = FieldMap("question", "answer")
ROWS = {
    "question": ["name : Aromi | area : city centre", "name : Zizzi", "name : Aromi | area : city centre"],
    "answer": [["Aromi is in the city centre.", "Aromi: city centre."], ["Zizzi."], ["In the centre."]],
    "id": [7, 8, 9],
}  # fmt: skip


def expected(rows: dict) -> list[Example]:
    """One Example per reference, written out from the columns (the reader's independent twin)."""
    return [Example(q, a) for q, refs in zip(rows["question"], rows["answer"], strict=True)
            for a in ([refs] if isinstance(refs, str) else refs)]  # fmt: skip


def write_folder(folder, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "train.parquet")
    flat = {"question": rows["question"], "answer": [r[0] for r in rows["answer"]]}
    pd.DataFrame(flat).to_csv(folder / "validation.csv", index=False)
    pd.DataFrame(flat).to_json(folder / "test.json", orient="records", lines=True)
    return folder


def test_parquet_file_maps_fields_and_a_list_target_gives_one_example_per_reference(tmp_path):
    path = tmp_path / "qa.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    assert load_examples(path, "train", fields=QA) == expected(ROWS)
    assert load_examples(path, "test", fields=QA) == expected(ROWS)  # a single file: any split
    grouped = load_examples(path, "test", fields=QA, grouped=True)
    assert [(e.source, e.references) for e in grouped] == [
        (ROWS["question"][0], ("Aromi is in the city centre.", "Aromi: city centre.",
                               "In the centre.")),
        (ROWS["question"][1], ("Zizzi.",)),
    ]  # fmt: skip


def test_folder_splits_by_file_name_across_formats(tmp_path):
    folder = write_folder(tmp_path / "qa")
    flat = {"question": ROWS["question"], "answer": [r[0] for r in ROWS["answer"]]}
    assert load_examples(folder, "train", fields=QA) == expected(ROWS)
    assert load_examples(folder, "dev", fields=QA) == expected(flat)  # validation.csv
    assert load_examples(folder, "test", fields=QA) == expected(flat)  # test.json (JSON lines)
    (folder / "validation.csv").unlink()
    with pytest.raises(DataError, match=r"no dev files \(looked for dev\.\*, validation\.\*"):
        load_examples(folder, "dev", fields=QA)


def test_sharded_files_are_read_in_name_order(tmp_path):
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    first = {"source": ["a b", "c d"], "target": ["1", "2"]}
    second = {"source": ["e f"], "target": ["3"]}
    pd.DataFrame(second).to_parquet(folder / "train-00001-of-00002.parquet")
    pd.DataFrame(first).to_parquet(folder / "train-00000-of-00002.parquet")
    got = load_examples(tmp_path / "hub", "train")  # default fields: source/target
    assert [(e.source, e.target) for e in got] == [("a b", "1"), ("c d", "2"), ("e f", "3")]


def test_saved_dataset_dict_and_single_dataset(tmp_path):
    train = datasets.Dataset.from_dict({"question": ROWS["question"], "answer": ROWS["answer"]})
    dev = datasets.Dataset.from_dict({"question": ["q"], "answer": [["r"]]})
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(tmp_path / "dd")
    assert is_hf_input(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd", "train", fields=QA) == expected(ROWS)
    assert load_examples(tmp_path / "dd", "dev", fields=QA) == [Example("q", "r")]
    with pytest.raises(DataError, match="no split 'test' .*train, validation"):
        load_examples(tmp_path / "dd", "test", fields=QA)
    dev.save_to_disk(tmp_path / "one")  # one Dataset: whichever split is asked
    assert load_examples(tmp_path / "one", "test", fields=QA) == [Example("q", "r")]


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("answer", None, r"row 1: field 'answer' is missing \(null\)"),
        ("answer", 5, r"row 1: field 'answer' is not a string.* \(got int\)"),
        ("answer", "   ", r"row 1: field 'answer' is empty"),
        ("question", 3.5, r"row 1: field 'question' is not a string \(got float\)"),
    ],
)
def test_a_bad_row_names_file_row_and_field(tmp_path, column, value, message):
    rows = {"question": ["q0", "q1"], "answer": ["a0", "a1"]}
    rows[column] = [rows[column][0], value]
    path = tmp_path / "bad.json"
    path.write_text("\n".join(json.dumps({k: v[i] for k, v in rows.items()}) for i in range(2)))
    with pytest.raises(DataError, match=f"^{path} " + message):
        load_examples(path, "train", fields=QA)


def test_a_list_target_with_a_non_string_names_its_position(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"question": "q", "answer": ["ok", 3]}) + "\n")
    with pytest.raises(DataError, match=r"row 0: field 'answer\[1\]' is not a string"):
        load_examples(path, "train", fields=QA)


def test_an_unknown_field_names_the_columns_and_the_flag(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    with pytest.raises(
        DataError,
        match=r"train\.parquet row 0: field 'source' is missing "
        r"\(columns: question, answer, id; choose one with --source-field\)",
    ):
        load_examples(path, "train")  # fmt: skip


def test_missing_file_and_offline_hub_id_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data file not found: .*nope.parquet"):
        load_examples(tmp_path / "nope.parquet", "train")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time
    for name in ("hf:someone/some_set", "someone/some_set"):
        assert is_hf_input(name)
        with pytest.raises(DataError, match=r"'someone/some_set'.*HF_DATASETS_OFFLINE=1"):
            load_examples(name, "train")


def test_jsonl_stays_on_its_reader_unless_a_field_mapping_is_given(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"source": "s", "target": "t", "references": ["r1", "r2"]}) + "\n")
    assert not is_hf_input(str(path)) and not is_hf_input(str(tmp_path))
    assert load_examples(path, "train") == [Example("s", "t", ("r1", "r2"))]  # today's reader
    mapped = tmp_path / "qa.jsonl"
    mapped.write_text(json.dumps({"q": "s2", "a": ["t2", "t3"]}) + "\n")
    assert is_hf_input(str(mapped), FieldMap("q", "a"))
    assert load_examples(mapped, "train", fields=FieldMap("q", "a")) == [
        Example("s2", "t2"), Example("s2", "t3")
    ]  # fmt: skip


def test_messages_column_builds_chat_examples(tmp_path):
    talk = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    path = tmp_path / "chat.parquet"
    pd.DataFrame({"conversation": [talk, talk[:1]]}).iloc[:1].to_parquet(path)
    (example,) = load_examples(path, "train", fields=FieldMap(messages="conversation"))
    assert example.target == "Hello!" and example.references == ("Hello!",)
    assert [dict(m) for m in example.messages] == talk
    assert example.source == "user: Hi there"
    pd.DataFrame({"conversation": [talk, talk[:1]]}).to_parquet(path)
    with pytest.raises(DataError, match=r"chat\.parquet row 1: 'messages' has no assistant"):
        load_examples(path, "train", fields=FieldMap(messages="conversation"))


def test_grouped_reading_keeps_each_conversation_whole_with_default_fields(tmp_path):
    """Two conversations with the same first user turn stay two Examples, messages kept."""
    first = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    second = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]
    path = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [first, second]}).to_parquet(path)
    grouped = load_examples(path, "test", grouped=True)  # default fields pick up `messages`
    assert [[dict(m) for m in e.messages] for e in grouped] == [first, second]
    assert [(e.target, e.references) for e in grouped] == [("Hello!", ("Hello!",)),
                                                          ("Hey.", ("Hey.",))]  # fmt: skip


def test_streamed_jsonl_reads_source_target_and_chat_lines_as_its_reader_does(tmp_path):
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    lines = [{"source": "s1", "target": "t1"}, {"messages": talk}, {"source": "s2", "target": "t2"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    streamed = list(example_stream(path, "train")())
    in_memory = load_examples(path, "train")  # data/jsonl.py
    assert [(e.source, e.target, e.messages) for e in streamed] == [
        (e.source, e.target, e.messages) for e in in_memory
    ]
    assert streamed[1].messages and streamed[1].target == "Hello!"


def test_cli_flags_carry_the_field_mapping():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert all(f in parser.format_help() for f in ("--source-field", "--target-field",
               "--messages-field", "--streaming", "--stream-buffer"))  # fmt: skip
    args = parser.parse_args(
        [
            "--data",
            "x.parquet",
            "--source-field",
            "question",
            "--target-field",
            "answer",
            "--streaming",
            "--stream-buffer",
            "64",
        ]
    )
    config, _ = configs_from_args(args)
    assert (config.source_field, config.target_field, config.messages_field) == (
        "question", "answer", "")  # fmt: skip
    assert config.streaming and config.stream_buffer == 64


def test_training_on_a_parquet_folder_reads_the_mapped_columns(tmp_path, bpe_tokenizer):
    folder = write_folder(tmp_path / "qa")
    config = TrainConfig(data=str(folder), source_field="question", target_field="answer",
                         out=str(tmp_path / "run"), batch_size=2, max_steps=3, lr=1e-2,
                         progress=False, max_source_tokens=48, max_target_tokens=24)  # fmt: skip
    train_examples, dev_examples = load_data(config)
    assert train_examples == expected(ROWS) and len(dev_examples) == 3
    torch.manual_seed(0)
    summary = train(config, PrefixConfig(length=2, mlp_hidden=16),
                    model=tiny_gpt2(TOKENIZER_VOCAB), tokenizer=bpe_tokenizer)  # fmt: skip
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_examples"] == len(expected(ROWS)) == 4 and summary["steps"] == 3
    assert summary["final_dev_loss"] is not None
