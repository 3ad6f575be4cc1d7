"""A prefix trained on chat data prompts at evaluation, in `generate` and in the server's chat
route exactly as training did: the ids equal the training conversation's prompt part."""

from __future__ import annotations

import argparse
import copy
import json
from types import SimpleNamespace

import pytest
import torch

from prefixtune.cli.evaluate import add_arguments_generate, run_generate
from prefixtune.config import GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.artifact import load_prefix
from prefixtune.core.models import load_model
from prefixtune.data.chat import prompt_messages
from prefixtune.data.chat_encoding import chat_prompt_ids, encode_chat
from prefixtune.data.encoding import IGNORE_INDEX
from prefixtune.data.readers import load_examples
from prefixtune.evaluation.predictor import Predictor, evaluate_run
from prefixtune.serving.openai_api import chat_prompt
from prefixtune.training.trainer import train

from conftest import TOKENIZER_VOCAB, tiny_gpt2

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
    "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)
SYSTEM = "Answer in one sentence."
TALKS = [
    [{"role": "user", "content": "name : The Eagle"},
     {"role": "assistant", "content": "The Eagle is a pub."},
     {"role": "user", "content": "area : riverside"},
     {"role": "assistant", "content": "It is by the river."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "food : French"},
     {"role": "assistant", "content": "French food."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("chat")
    model_dir = root / "model"
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = TEMPLATE
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny_gpt2(TOKENIZER_VOCAB, positions=256).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": t}) + "\n" for t in TALKS))
    config = TrainConfig(data=str(data), model=str(model_dir), out=str(root / "run"),
                         max_steps=1, batch_size=2, progress=False, system=SYSTEM,
                         max_source_tokens=80, max_target_tokens=80)  # fmt: skip
    train(config, PrefixConfig(length=2, reparam=False))
    return root / "run", data, model_dir


def training_prompts(tokenizer, examples):
    """Each training row's ids before its last assistant turn's first learned token."""
    out = []
    for item in encode_chat(examples, tokenizer, template=TEMPLATE, system=SYSTEM):
        learned = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
        out.append(item.input_ids[: max(i for i in learned if i - 1 not in learned)])
    return out


def test_template_and_system_are_kept_in_the_artifact_and_run(chat_run):
    run, _, _ = chat_run
    meta = load_prefix(run / "prefix").meta
    assert (meta["chat_template"], meta["system"]) == (TEMPLATE, SYSTEM)
    info = json.loads((run / "run.json").read_text())
    assert info["chat_template"] == TEMPLATE and info["train_config"]["system"] == SYSTEM


def test_predictor_and_server_prompt_as_training_did(chat_run, bpe_tokenizer):
    run, data, model_dir = chat_run
    model, tokenizer = load_model(str(model_dir))
    examples = load_examples(str(data), "train")
    expected = training_prompts(tokenizer, examples)
    prefix = load_prefix(run / "prefix")
    # a tokenizer without any template: the artifact's template is what counts
    predictor = Predictor.from_artifact(run / "prefix", model, bpe_tokenizer, 80)
    server = SimpleNamespace(tokenizer=bpe_tokenizer, check_chars=lambda _text: None,
                             bank=SimpleNamespace(get=lambda _name: prefix))  # fmt: skip
    for example, want in zip(examples, expected, strict=True):
        messages = prompt_messages(example.messages)
        assert predictor.prompt(messages) == want
        assert chat_prompt(server, "p", [dict(m) for m in messages]) == want
    first = expected[0]
    assert bpe_tokenizer.decode(first).count(SYSTEM) == 1  # the default went in, once
    assert SYSTEM not in bpe_tokenizer.decode(expected[1])  # the own system turn won


def test_a_developer_turn_is_the_system_turn_in_training_and_the_server(chat_run, bpe_tokenizer):
    run, _, _ = chat_run
    prefix = load_prefix(run / "prefix")
    server = SimpleNamespace(tokenizer=bpe_tokenizer, check_chars=lambda _text: None,
                             bank=SimpleNamespace(get=lambda _name: prefix))  # fmt: skip
    messages = [{"role": "developer", "content": "Be terse."},
                {"role": "user", "content": "food : French"}]  # fmt: skip
    ids = chat_prompt_ids(bpe_tokenizer, messages, TEMPLATE, SYSTEM)
    assert chat_prompt(server, "p", messages) == ids
    assert SYSTEM not in bpe_tokenizer.decode(ids)  # no default before the developer turn


def test_the_server_refuses_a_chat_without_any_template(bpe_tokenizer):
    from prefixtune.serving.openai_api import OpenAIError

    checked = []
    server = SimpleNamespace(tokenizer=bpe_tokenizer, check_chars=checked.append,
                             bank=SimpleNamespace(get=lambda _name: SimpleNamespace(meta={})))  # fmt: skip
    with pytest.raises(OpenAIError, match="no chat template: use /v1/completions"):
        chat_prompt(server, "p", [{"role": "user", "content": "hi"}])
    server.tokenizer = copy.deepcopy(bpe_tokenizer)
    server.tokenizer.chat_template = TEMPLATE
    ids = chat_prompt(server, None, [{"role": "user", "content": "hi"}])
    assert ids == chat_prompt_ids(server.tokenizer, [{"role": "user", "content": "hi"}], TEMPLATE)
    assert checked == ["hi"]


def test_generate_prompts_a_plain_input_as_one_user_turn(chat_run, bpe_tokenizer, capsys):
    run, _, model_dir = chat_run
    model, tokenizer = load_model(str(model_dir))
    predictor = Predictor.from_artifact(run / "prefix", model, tokenizer, 80)
    want = chat_prompt_ids(tokenizer, [{"role": "user", "content": "name : Aromi"}], TEMPLATE,
                           SYSTEM)  # fmt: skip
    assert predictor.prompt("name : Aromi") == want
    text = tokenizer.decode(want)
    assert text.startswith(f"<s><|system|>\n{SYSTEM}</s>") and text.endswith("<|assistant|>\n")
    parser = argparse.ArgumentParser()
    add_arguments_generate(parser)
    args = parser.parse_args(["--prefix", str(run), "--input", "name : Aromi",
                              "--max-new-tokens", "3"])  # fmt: skip
    assert run_generate(args) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_evaluate_scores_the_last_assistant_turn(chat_run, tmp_path):
    run, data, _ = chat_run
    report = evaluate_run(run, "test", config=GenerateConfig(max_new_tokens=4), bootstrap=0,
                          out=tmp_path / "ev", progress=False)  # fmt: skip
    assert report["items"] == 2
    references = (tmp_path / "ev" / "references.txt").read_text()
    assert references == "It is by the river.\n\nFrench food.\n"
