"""A run's data, ready to train on: examples read (or given), encoded, tagged with task ids for
multi-task runs, and batched (length-bucketed training batches, fixed dev batches)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from prefixtune.config import ConfigError, TrainConfig
from prefixtune.core.models import is_encoder_decoder
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import (
    Batches,
    Encoded,
    collate,
    collate_seq2seq,
    encode,
    length_bucketed_batches,
)
from prefixtune.data.readers import load_examples, subsample
from prefixtune.data.records import Example
from prefixtune.methods.multitask import tag, tag_items, task_list, with_task_ids

log = logging.getLogger(__name__)


def load_data(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Training examples (one per reference, subsampled if asked) and dev examples.

    Multi-task: each task's examples (subsampled per task), tagged with its index.
    """
    tasks = task_list(config)
    if tasks:
        parts = [load_data(replace(config, data=t.data, method="prefix")) for t in tasks]
        train = [e for i, (part, _) in enumerate(parts) for e in tag(part, i)]
        return train, [e for i, (_, part) in enumerate(parts) for e in tag(part, i)]
    if config.data == "builtin":
        train, dev = builtin_examples("train"), builtin_examples("dev")
    else:
        train = load_examples(config.data, config.train_split)
        dev = load_examples(config.data, config.dev_split) if config.dev_split else []
    if config.train_size:
        train = subsample(train, config.train_size, config.seed)
    if config.dev_size and len(dev) > config.dev_size:
        dev = subsample(dev, config.dev_size, config.seed)
    return train, dev


def data_hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        task = getattr(example, "task", None)  # multi-task examples hash their task too
        digest.update(f"{example.source}\x00{example.target}\x01".encode())
        if task is not None:
            digest.update(f"{task}\x02".encode())
    return digest.hexdigest()[:16]


def make_collate(model, tokenizer) -> Callable[[list[Encoded]], dict[str, torch.Tensor]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if is_encoder_decoder(model):
        return lambda items: collate_seq2seq(items, pad)
    return lambda items: collate(items, pad)


def encode_examples(examples, model, tokenizer, config: TrainConfig) -> list[Encoded]:
    items, stats = encode(
        examples,
        tokenizer,
        encoder_decoder=is_encoder_decoder(model),
        max_source_tokens=config.max_source_tokens,
        max_target_tokens=config.max_target_tokens,
        separator=config.separator,
    )
    if stats.warning():
        log.warning(stats.warning())
    return items


@dataclass
class PreparedData:
    """What the trainer needs of the data: batches, the encoded items (for the position check)
    and the examples they came from."""

    batches: Batches
    dev_batches: list[dict[str, torch.Tensor]]
    train_items: list[Encoded]
    dev_items: list[Encoded]
    train_examples: list[Example]
    dev_examples: list[Example]
    data_hash: str


def prepare_data(config: TrainConfig, model, tokenizer, tasks: list[str],
                 train_examples: list[Example] | None = None,
                 dev_examples: list[Example] | None = None) -> PreparedData:  # fmt: skip
    """Read (unless given), encode and batch the run's train and dev examples."""
    if train_examples is None:
        train_examples, dev_examples = load_data(config)
    if not train_examples:
        raise ConfigError(f"no training examples in {config.data} / {config.train_split}")
    dev_examples = dev_examples or []
    collate_fn = make_collate(model, tokenizer)
    train_items = encode_examples(train_examples, model, tokenizer, config)
    dev_items = encode_examples(dev_examples, model, tokenizer, config)
    if tasks:  # every row carries its task id
        collate_fn = with_task_ids(collate_fn)
        train_items = tag_items(train_items, train_examples, len(tasks))
        dev_items = tag_items(dev_items, dev_examples, len(tasks))
    batches = Batches(train_items, collate_fn, config.batch_size, seed=config.seed * 100_003,
                      max_tokens=config.max_batch_tokens)  # fmt: skip
    order = length_bucketed_batches([len(i.input_ids) for i in dev_items], config.batch_size * 2,
                                    seed=0, shuffle=False) if dev_items else []  # fmt: skip
    dev_batches = [collate_fn([dev_items[i] for i in b]) for b in order]
    return PreparedData(batches, dev_batches, train_items, dev_items, train_examples,
                        dev_examples, data_hash(train_examples))  # fmt: skip
