"""Chat data: {"messages": [...]} lines checked, rendered with a chat template, loss on every
assistant turn; token ids and the mask compared with the template's own rendering and a mask
built by hand from the template's pieces."""

from __future__ import annotations

import copy
import json

import pytest

from prefixtune.config import TrainConfig
from prefixtune.data.chat import chat_example, prompt_messages, validate_messages, with_system
from prefixtune.data.chat_encoding import (
    chat_prompt_ids,
    chat_template_of,
    encode_chat,
    encode_chat_one,
    example_prompt_ids,
)
from prefixtune.data.encoding import IGNORE_INDEX, encode
from prefixtune.data.readers import load_examples
from prefixtune.data.records import DataError, Example
from prefixtune.training.prepare import encode_examples

from conftest import TOKENIZER_VOCAB, tiny_gpt2

# A ChatML-like template whose pieces split at token boundaries (special tokens, newlines), so
# the expected ids can be built piece by piece, independently of the offset-based encoder.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
    "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)
TALK = [
    {"role": "user", "content": "name : The Eagle"},
    {"role": "assistant", "content": "The Eagle is a pub."},
    {"role": "user", "content": "area : riverside"},
    {"role": "assistant", "content": "It is by the river."},
]


@pytest.fixture(scope="module")
def chat_tok(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def hand_built(tok, messages, bos=True):
    """(ids, labels) assembled from the template's pieces: content + EOS learned on assistant
    turns, everything else -100."""
    pieces = [("<s>", False)] if bos else []
    for m in messages:
        learn = m["role"] == "assistant"
        pieces += [(f"<|{m['role']}|>\n", False), (m["content"], learn), ("</s>", learn)]
        pieces.append(("\n", False))
    ids, labels = [], []
    for text, learn in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if learn else [IGNORE_INDEX] * len(part)
    return ids, labels


# ------------------------------------------------------------------ validation and examples
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hi", "must be a list"),
        ([], "is empty"),
        ([{"role": "user", "content": "a"}], "no assistant turn"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object"),
        ([{"role": "bot", "content": "a"}], r"messages\[0\]\.role must be one of"),
        ([{"role": "assistant", "content": 3}], r"messages\[0\]\.content must be a string"),
        ([{"role": "assistant"}], r"messages\[0\]\.content must be a string, got missing"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "empty"),
    ],
)
def test_bad_messages_are_refused_naming_where(messages, match):
    with pytest.raises(DataError, match=f"^train.jsonl line 7: .*{match}"):
        validate_messages(messages, "train.jsonl line 7")


def test_chat_example_targets_the_last_assistant_turn():
    example = chat_example(TALK + [{"role": "user", "content": "thanks"}], "x")
    assert example.target == "It is by the river."
    assert example.references == ("It is by the river.",)
    assert len(example.messages) == 5
    assert prompt_messages(example.messages) == tuple(TALK[:3])
    assert example.source.splitlines()[0] == "user: name : The Eagle"


def test_system_default_goes_first_only_where_there_is_none():
    assert with_system(TALK, "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    own = [{"role": "system", "content": "mine"}, *TALK]
    assert with_system(own, "Be brief.") == tuple(own)
    assert with_system(TALK, "") == tuple(TALK)
    developer = [{"role": "developer", "content": "mine"}, *TALK]  # OpenAI's system role
    assert with_system(developer, "Be brief.") == tuple(developer)


def test_jsonl_mixes_source_target_and_messages_lines(tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [{"source": "a : b", "target": "A b."}, {"messages": TALK, "meta": {"id": "c1"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, chat = load_examples(str(path), "train")
    assert (plain.source, plain.target, plain.messages) == ("a : b", "A b.", ())
    assert chat.messages == tuple(TALK) and chat.target == TALK[-1]["content"]
    assert dict(chat.meta) == {"id": "c1", "file": str(path), "line": "2"}
    grouped = load_examples(str(path), "test", grouped=True)
    assert grouped[1].messages == tuple(TALK)


def test_bad_jsonl_messages_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": TALK})
    bad = json.dumps({"messages": [TALK[0], {"role": "robot", "content": "x"}]})
    path.write_text(f"{good}\n\n{bad}\n")
    with pytest.raises(DataError, match=rf"{path} line 3: messages\[1\]\.role"):
        load_examples(str(path), "train")
    path.write_text(json.dumps({"messages": TALK, "target": "x"}) + "\n")
    with pytest.raises(DataError, match="line 1: a 'messages' line takes no 'target'"):
        load_examples(str(path), "train")


# ---------------------------------------------------------------------------- token ids
def test_ids_are_the_templates_rendering_and_every_assistant_turn_is_learned(chat_tok):
    item = encode_chat_one(chat_tok, TALK, TEMPLATE, "x", None)
    rendered = chat_tok.apply_chat_template(TALK, tokenize=False)
    assert item.input_ids == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    ids, labels = hand_built(chat_tok, TALK)
    assert item.input_ids == ids
    assert item.labels == labels
    learned = [t for t in item.labels if t != IGNORE_INDEX]
    assert chat_tok.decode(learned) == "The Eagle is a pub.</s>It is by the river.</s>"


def test_training_prompt_part_is_the_generation_prompt(chat_tok):
    example = chat_example(TALK, "x")
    (item,) = encode_chat([example], chat_tok, template=TEMPLATE, system="Be brief.")
    prompt = example_prompt_ids(chat_tok, example, TEMPLATE, "Be brief.")
    learned = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
    last_start = max(i for i in learned if i - 1 not in learned)  # the last run of labels
    assert prompt == item.input_ids[:last_start]
    assert item.labels[len(prompt)] != IGNORE_INDEX and item.labels[len(prompt) - 1] < 0
    ids, labels = hand_built(chat_tok, with_system(TALK, "Be brief."))
    assert (item.input_ids, item.labels) == (ids, labels)


def test_too_long_conversation_is_refused_with_file_and_line(chat_tok):
    example = Example("", "x", (), {"file": "chat.jsonl", "line": "4"}, tuple(TALK))
    n = len(hand_built(chat_tok, TALK)[0])
    encode_chat([example], chat_tok, template=TEMPLATE, max_tokens=n)
    with pytest.raises(DataError, match=rf"^chat.jsonl line 4: .* {n} tokens .*limit of {n - 1}"):
        encode_chat([example], chat_tok, template=TEMPLATE, max_tokens=n - 1)


def test_template_that_renders_the_last_turn_differently_is_refused(chat_tok):
    odd = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"example 1: .*messages\[1\] \(assistant\)"):
        encode_chat([chat_example(TALK, "x")], chat_tok, template=odd)


def test_a_tokenizer_without_template_is_a_clear_error(bpe_tokenizer):
    with pytest.raises(DataError, match="needs a chat template"):
        chat_template_of(bpe_tokenizer)


def test_server_style_prompt_equals_template_rendering(chat_tok):
    ids = chat_prompt_ids(chat_tok, TALK[:1], TEMPLATE, "sys")
    text = chat_tok.apply_chat_template(
        [{"role": "system", "content": "sys"}, TALK[0]], tokenize=False, add_generation_prompt=True
    )
    assert ids == chat_tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------- routing in training
def test_training_routes_chat_examples_and_keeps_plain_ones_unchanged(chat_tok):
    model = tiny_gpt2(TOKENIZER_VOCAB)
    plain = Example("name : Aromi", "Aromi is a cafe.")
    chat = chat_example(TALK, "x")
    config = TrainConfig(max_source_tokens=40, max_target_tokens=80, system="S")
    items = encode_examples([plain, chat, plain], model, chat_tok, config)
    (expected,), _ = encode([plain], chat_tok, encoder_decoder=False, max_source_tokens=40,
                            max_target_tokens=80)  # fmt: skip
    assert items[0] == expected and items[2] == expected
    assert (items[1].input_ids, items[1].labels) == hand_built(chat_tok, with_system(TALK, "S"))


def test_training_refuses_chat_data_over_the_token_limits(chat_tok):
    model = tiny_gpt2(TOKENIZER_VOCAB)
    example = Example("", "x", (), {"file": "c.jsonl", "line": "9"}, tuple(TALK))
    config = TrainConfig(max_source_tokens=8, max_target_tokens=8)
    with pytest.raises(DataError, match=r"c.jsonl line 9: .*limit of 16 \(--max-source-tokens"):
        encode_examples([example], model, chat_tok, config)


def test_the_chat_limit_leaves_room_for_the_prefix(chat_tok):
    example = Example("", "x", (), {"file": "c.jsonl", "line": "9"}, tuple(TALK))
    config = TrainConfig(max_source_tokens=200, max_target_tokens=200)
    (item,) = encode_examples([example], tiny_gpt2(TOKENIZER_VOCAB), chat_tok, config)
    n = len(item.input_ids)
    model = tiny_gpt2(TOKENIZER_VOCAB, positions=n + 2)
    assert encode_examples([example], model, chat_tok, config, offset=2) == [item]  # fits
    with pytest.raises(DataError, match=rf"c.jsonl line 9: .*limit of {n - 1} \(the model's "
                                        rf"{n + 2} positions less a prefix of 3\)"):  # fmt: skip
        encode_examples([example], model, chat_tok, config, offset=3)


def test_multitask_tagging_keeps_the_task_and_the_conversation():
    from prefixtune.methods.multitask import tag

    (tagged,) = tag([chat_example(TALK, "x")], 1)
    assert tagged.task == 1 and tagged.messages == tuple(TALK)
