"""Multi-task training: one prefix per task, mixed batches, one artifact per task."""

from __future__ import annotations

import json

import pytest
import torch

from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.core.artifact import (
    load_encoder,
)
from prefixtune.core.attention import prefixed_forward
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import collate, collate_seq2seq, encode
from prefixtune.methods.multitask import (
    TASK_KEY,
    Task,
    TaskEncoded,
    parse_tasks,
    tag,
    task_list,
    with_task_ids,
)
from prefixtune.methods.objective import target_positions
from prefixtune.methods.prefix_method import PrefixMethod
from prefixtune.methods.registry import build_method
from prefixtune.training.trainer import Trainer

from conftest import (
    TOKENIZER_VOCAB,
    load_prefix_set,
    prefix_set_kv,
    tiny_bart,
    tiny_gpt2,
    tiny_llama,
)

LIMITS = {"max_source_tokens": 48, "max_target_tokens": 24}
PREFIX = PrefixConfig(length=3, mlp_hidden=16)


def test_task_specs_parse_and_bad_ones_name_the_problem():
    assert parse_tasks("e2e,webnlg") == [Task("e2e", "e2e"), Task("webnlg", "webnlg")]
    assert parse_tasks("table=e2e, web=data/web.jsonl") == [
        Task("table", "e2e"), Task("web", "data/web.jsonl")
    ]  # fmt: skip
    assert parse_tasks("data/web.jsonl,dart") == [
        Task("web", "data/web.jsonl"),
        Task("dart", "dart"),
    ]
    assert task_list(TrainConfig(data="e2e")) == []
    assert task_list(TrainConfig(data="e2e", method="multitask")) == [Task("e2e", "e2e")]
    for spec, message in [("e2e,e2e", "given twice"), ("a=e2e,b=", "needs a dataset"),
                          ("a.b=e2e,c=dart", "letters, digits"), ("e2e,", "needs a dataset")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            parse_tasks(spec)
    with pytest.raises(ConfigError, match="prefixes only"):
        task_list(TrainConfig(data="e2e,dart", method="finetune"))


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama, tiny_bart])
def test_each_prefix_gets_the_single_task_gradient_of_its_rows(builder, bpe_tokenizer):
    """Mixed batch, 3 tasks: prefix t's gradient == N_t / N x the gradient of the single-task
    loss on task t's rows alone (same weights), N_t / N its share of the target tokens."""
    model = builder(TOKENIZER_VOCAB)
    seq2seq = builder is tiny_bart
    if seq2seq:
        model.config.pad_token_id = bpe_tokenizer.pad_token_id
    method = build_method("multitask", model, bpe_tokenizer, PREFIX, seed=1, tasks=["a", "b", "c"])
    items, _ = encode(builtin_examples("train")[:9], bpe_tokenizer, encoder_decoder=seq2seq,
                      **LIMITS)  # fmt: skip
    tasks = [0, 1, 2, 0, 1, 0, 2, 1, 0]
    items = [TaskEncoded(it.input_ids, it.labels, t) for it, t in zip(items, tasks, strict=True)]
    pad = bpe_tokenizer.pad_token_id
    base = (
        (lambda rows: collate_seq2seq(rows, pad)) if seq2seq else (lambda rows: collate(rows, pad))
    )
    batch = with_task_ids(base)(items)
    assert batch[TASK_KEY].tolist() == tasks
    method.loss(batch).backward()
    mixed = {name: _grads(encoder) for name, encoder in method.encoders.items()}
    total = target_positions(model, batch["labels"])[1].numel()

    for index, (name, encoder) in enumerate(method.encoders.items()):
        encoder.zero_grad(set_to_none=True)
        rows = base([it for it, task in zip(items, tasks, strict=True) if task == index])
        share = target_positions(model, rows["labels"])[1].numel() / total
        (PrefixMethod(model, encoder).loss(rows) * share).backward()
        alone = _grads(encoder)
        for param, grad in alone.items():
            where, ours = f"{name}.{param}", mixed[name][param]
            assert grad.norm() > 0, where  # a gradient that can be wrong
            torch.testing.assert_close(ours, grad, atol=1e-6, rtol=0, msg=where)
            assert (ours - grad).norm() / grad.norm() < 1e-5, where  # relative, for small grads


def _run(tmp_path, tokenizer, name: str, data: str, train, **overrides) -> Trainer:
    torch.manual_seed(0)  # the same frozen base for every run
    values = dict(data=data, out=str(tmp_path / name), batch_size=4, lr=5e-3, max_steps=4,
                  dev_size=0, progress=False, log_every=1, seed=3, autocast="float32",
                  **LIMITS)  # fmt: skip
    config = TrainConfig(**{**values, **overrides})
    return Trainer(config, PREFIX, model=tiny_llama(TOKENIZER_VOCAB), tokenizer=tokenizer,
                   train_examples=train, dev_examples=[])  # fmt: skip


def test_a_one_task_run_is_a_single_task_run(tmp_path, bpe_tokenizer):
    examples = builtin_examples("train")[:12]
    _run(tmp_path, bpe_tokenizer, "single", "builtin", examples).fit()
    _run(tmp_path, bpe_tokenizer, "multi", "builtin", tag(examples, 0), method="multitask").fit()
    single = load_encoder(tmp_path / "single" / "checkpoint").state_dict()
    multi = load_encoder(tmp_path / "multi" / "checkpoint" / "builtin").state_dict()
    for name in single:
        torch.testing.assert_close(multi[name], single[name], atol=1e-6, rtol=0, msg=name)


def test_one_artifact_per_task_reloads_to_the_same_per_row_outputs(tmp_path, bpe_tokenizer):
    examples = builtin_examples("train")
    train = tag(examples[:10], 0) + tag(examples[10:22], 1)
    trainer = _run(tmp_path, bpe_tokenizer, "run", "table=builtin,web=builtin", train)
    summary = trainer.fit()
    out = tmp_path / "run"
    assert not (out / "prefix").exists() and summary["artifact"] == "prefixes"
    index = json.loads((out / "prefixes" / "index.json").read_text())
    assert [(t["name"], t["task_id"]) for t in index["tasks"]] == [("table", 0), ("web", 1)]
    assert [t["train_examples"] for t in summary["tasks"]] == [10, 12]
    assert (
        summary["trainable_parameters"]
        == 2 * load_encoder(out / "checkpoint" / "table").num_trainable()
    )
    loaded = load_prefix_set(out / "prefixes")
    assert list(loaded) == ["table", "web"] and loaded["web"].meta["task"] == "web"

    items, _ = encode(examples[30:36], bpe_tokenizer, encoder_decoder=False, **LIMITS)
    batch = collate(items, bpe_tokenizer.pad_token_id)
    row_tasks = ["web", "table", "table", "web", "table", "web"]
    rows = torch.tensor([["table", "web"].index(t) for t in row_tasks])
    model, method = trainer.model, trainer.method
    with torch.no_grad():
        live = prefixed_forward(model, batch["input_ids"], batch["attention_mask"],
                                method.prefix_kv(rows)).logits  # fmt: skip
        folded = prefixed_forward(model, batch["input_ids"], batch["attention_mask"],
                                  prefix_set_kv(loaded, row_tasks)).logits  # fmt: skip
        torch.testing.assert_close(folded, live, atol=1e-5, rtol=1e-5)
        for i, task in enumerate(row_tasks):  # each row alone with its own task's prefix
            width = int(batch["attention_mask"][i].sum())
            ids, mask = (
                batch["input_ids"][i : i + 1, :width],
                batch["attention_mask"][i : i + 1, :width],
            )
            alone = prefixed_forward(model, ids, mask, loaded[task].to_prefix_kv()).logits
            torch.testing.assert_close(folded[i : i + 1, :width], alone, atol=1e-5, rtol=1e-5)

    other = _run(tmp_path, bpe_tokenizer, "run", "table=builtin,news=builtin", train, resume=True)
    with pytest.raises(ConfigError, match="holds tasks"):
        other.fit()
