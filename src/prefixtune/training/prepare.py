"""A run's data, ready to train on: examples read (or given), encoded, tagged with task ids for
multi-task runs, and batched (length-bucketed training batches, fixed dev batches)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

import torch

from prefixtune.config import ConfigError, TrainConfig
from prefixtune.core.limits import check_positions, position_limit
from prefixtune.core.models import is_encoder_decoder
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.chat_encoding import chat_template_of, encode_chat
from prefixtune.data.encoding import (
    Batches,
    Encoded,
    collate,
    collate_seq2seq,
    encode,
    length_bucketed_batches,
)
from prefixtune.data.hf_datasets import FieldMap
from prefixtune.data.readers import example_stream, load_examples, subsample
from prefixtune.data.records import Example
from prefixtune.data.streaming import StreamingBatches
from prefixtune.methods.multitask import tag, tag_items, task_list, with_task_ids

log = logging.getLogger(__name__)
POSITION_HINT = "lower --max-source-tokens / --max-target-tokens or --prefix-length"


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
        train = load_examples(config.data, config.train_split, fields=field_map(config))
        dev = _dev_examples(config)
    if config.train_size:
        picked = config.seed if config.subsample_seed < 0 else config.subsample_seed
        train = subsample(train, config.train_size, picked)
    if config.dev_size and len(dev) > config.dev_size:
        dev = subsample(dev, config.dev_size, config.seed)
    return train, dev


def field_map(config: TrainConfig) -> FieldMap:
    """The columns --source-field, --target-field and --messages-field name."""
    return FieldMap(config.source_field, config.target_field, config.messages_field)


def _dev_examples(config: TrainConfig) -> list[Example]:
    if not config.dev_split:
        return []
    return load_examples(config.data, config.dev_split, fields=field_map(config))


def data_hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        task = getattr(example, "task", None)  # multi-task examples hash their task too
        digest.update(f"{example.source}\x00{example.target}\x01".encode())
        if example.messages:  # a chat example: its whole conversation
            digest.update(json.dumps(list(example.messages), sort_keys=True).encode())
        if task is not None:
            digest.update(f"{task}\x02".encode())
    return digest.hexdigest()[:16]


def make_collate(model, tokenizer) -> Callable[[list[Encoded]], dict[str, torch.Tensor]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if is_encoder_decoder(model):
        return lambda items: collate_seq2seq(items, pad)
    return lambda items: collate(items, pad)


def chat_limit(model, config: TrainConfig, offset: int = 0) -> tuple[int, str]:
    """The most tokens a rendered conversation may have after `offset` prefix positions, and
    what sets it (for the error)."""
    limit, hint = config.max_source_tokens + config.max_target_tokens, (
        " (--max-source-tokens + --max-target-tokens)")  # fmt: skip
    positions = position_limit(model)
    if positions is not None and positions - offset < limit:
        less = f" less a prefix of {offset}" if offset else ""
        return positions - offset, f" (the model's {positions} positions{less})"
    return limit, hint


def check_longest(model, items: list[Encoded], examples: list[Example], offset: int,
                  name: Callable[[int], str], scope: str = "") -> None:  # fmt: skip
    """Refuse, before training, the longest of `items` if it runs past the model's positions
    once `offset` prefix positions come first; `name(i)` names example i (called on failure),
    `scope` what it is the longest of."""
    limit = position_limit(model)
    if limit is None or not items:
        return
    longest = max(range(len(items)), key=lambda i: len(items[i].input_ids))
    tokens = len(items[longest].input_ids)
    if offset + tokens <= limit:
        return
    source = " ".join(examples[longest].source.split())
    check_positions(
        limit,
        prefix=offset,
        tokens=tokens,
        hint=POSITION_HINT,
        what=f"{name(longest)} (the longest{scope}; source {source[:40]!r})",
    )


def encode_examples(examples, model, tokenizer, config: TrainConfig,
                    offset: int = 0) -> list[Encoded]:  # fmt: skip
    """Token ids and labels of every example, in order: source/target examples as `encode`
    does, chat examples rendered with the tokenizer's chat template (loss on assistant turns),
    refused where longer than the model's positions less `offset` (the method's prefix)."""
    chat = [i for i, e in enumerate(examples) if e.messages]
    if not chat:
        return _encode_plain(examples, model, tokenizer, config)
    if is_encoder_decoder(model):
        raise ConfigError(f"{config.data}: chat data ('messages' lines) needs a decoder-only "
                          "model with a chat template")  # fmt: skip
    limit, hint = chat_limit(model, config, offset)
    chat_items = encode_chat([examples[i] for i in chat], tokenizer,
                             template=chat_template_of(tokenizer), system=config.system,
                             max_tokens=limit, limit_hint=hint, indices=chat)  # fmt: skip
    chat_set = set(chat)
    plain = [i for i in range(len(examples)) if i not in chat_set]
    plain_items = _encode_plain([examples[i] for i in plain], model, tokenizer, config)
    items: list[Encoded | None] = [None] * len(examples)
    for i, item in zip(chat + plain, chat_items + plain_items, strict=True):
        items[i] = item
    return items  # type: ignore[return-value]


def chat_meta(examples: list[Example], tokenizer, config: TrainConfig) -> dict[str, str]:
    """What inference must reuse for chat data: the template (and the system default)."""
    if not any(e.messages for e in examples):
        return {}
    return {"chat_template": chat_template_of(tokenizer), "system": config.system}


def _encode_plain(examples, model, tokenizer, config: TrainConfig) -> list[Encoded]:
    if not examples:
        return []
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

    batches: Batches | StreamingBatches
    dev_batches: list[dict[str, torch.Tensor]]
    train_items: list[Encoded]
    dev_items: list[Encoded]
    train_examples: list[Example]
    dev_examples: list[Example]
    data_hash: str
    chat: dict[str, str] = field(default_factory=dict)  # chat_template, system (chat data only)


def prepare_data(config: TrainConfig, model, tokenizer, tasks: list[str],
                 train_examples: list[Example] | None = None,
                 dev_examples: list[Example] | None = None,
                 offset: int = 0) -> PreparedData:  # fmt: skip
    """Read (unless given), encode and batch the run's train and dev examples; `offset`: the
    positions the method's prefix takes before them (trainer.position_offset)."""
    if config.streaming and train_examples is None:
        return prepare_stream(config, model, tokenizer, tasks, offset)
    if train_examples is None:
        train_examples, dev_examples = load_data(config)
    if not train_examples:
        raise ConfigError(f"no training examples in {config.data} / {config.train_split}")
    dev_examples = dev_examples or []
    collate_fn = make_collate(model, tokenizer)
    train_items = encode_examples(train_examples, model, tokenizer, config, offset)
    dev_items = encode_examples(dev_examples, model, tokenizer, config, offset)
    if tasks:  # every row carries its task id
        collate_fn = with_task_ids(collate_fn)
        train_items = tag_items(train_items, train_examples, len(tasks))
        dev_items = tag_items(dev_items, dev_examples, len(tasks))
    batches = Batches(train_items, collate_fn, config.batch_size, seed=config.seed * 100_003,
                      max_tokens=config.max_batch_tokens)  # fmt: skip
    return PreparedData(batches, dev_batches(dev_items, collate_fn, config), train_items,
                        dev_items, train_examples, dev_examples, data_hash(train_examples),
                        chat_meta(train_examples, tokenizer, config))  # fmt: skip


def dev_batches(
    items: list[Encoded], collate_fn, config: TrainConfig
) -> list[dict[str, torch.Tensor]]:
    """The fixed dev batches: length-bucketed, twice the training batch size, never shuffled."""
    if not items:
        return []
    order = length_bucketed_batches([len(i.input_ids) for i in items], config.batch_size * 2,
                                    seed=0, shuffle=False)  # fmt: skip
    return [collate_fn([items[i] for i in b]) for b in order]


def _check_streaming(config: TrainConfig, tasks: list[str]) -> None:
    if tasks:
        raise ConfigError("--streaming trains one task: give --data a single dataset")
    if config.train_size:
        raise ConfigError("--train-size subsamples in memory; with --streaming use --max-steps")
    if config.stream_buffer < 1:
        raise ConfigError(f"--stream-buffer must be >= 1, got {config.stream_buffer}")
    if config.max_batch_tokens and not config.max_steps:
        raise ConfigError("--streaming with --max-batch-tokens needs --max-steps (the batches of "
                          "a pass are known only once read)")  # fmt: skip


def prepare_stream(config: TrainConfig, model, tokenizer, tasks: list[str],
                   offset: int = 0) -> PreparedData:  # fmt: skip
    """--streaming: training batches read from the stream buffer by buffer (StreamingBatches),
    each buffer's longest item checked against the model's positions before it trains; dev
    examples in memory; the data hash names the input, not its contents."""
    _check_streaming(config, tasks)
    fields = field_map(config)
    stream = example_stream(config.data, config.train_split, fields)
    dev_examples = _dev_examples(config)
    if config.dev_size and len(dev_examples) > config.dev_size:
        dev_examples = subsample(dev_examples, config.dev_size, config.seed)
    collate_fn = make_collate(model, tokenizer)

    def encode_buffer(examples: list[Example]) -> list[Encoded]:
        items = encode_examples(examples, model, tokenizer, config, offset)
        check_longest(model, items, examples, offset, scope=" of its buffer",
                      name=lambda i: _streamed_name(stream, examples[i], config.data))  # fmt: skip
        return items

    batches = StreamingBatches(stream, encode_buffer, collate_fn, config.batch_size,
                               seed=config.seed * 100_003, buffer=config.stream_buffer,
                               max_tokens=config.max_batch_tokens)  # fmt: skip
    dev_items = encode_examples(dev_examples, model, tokenizer, config, offset)
    digest = hashlib.sha256(f"stream\x00{config.data}\x00{fields}".encode()).hexdigest()[:16]
    first = list(islice(stream(), 1))  # chat data: the template is kept with the run
    return PreparedData(batches, dev_batches(dev_items, collate_fn, config), [], dev_items, [],
                        dev_examples, digest, chat_meta(first, tokenizer, config))  # fmt: skip


def _streamed_name(stream: Callable[[], Iterator[Example]], example: Example, data: str) -> str:
    """'streamed training example N in DATA': N found by reading the stream again (errors only)."""
    number = next((n for n, e in enumerate(stream(), 1) if e == example), None)
    return f"streamed training example {number or '?'} in {data}"
