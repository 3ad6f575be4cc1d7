"""Multi-task prefix-tuning: one run, one frozen model, one prefix per task, mixed batches.

`--data` names several tasks: "e2e,webnlg" (each task named after its dataset) or
"e2e=e2e,web=data/web.jsonl" (name=dataset). Every task's examples are pooled and
length-bucketed together, so a batch mixes tasks; each row carries its task id
(batch["task_ids"], (B,) long) and `MultiPrefixMethod` stacks the N task prefixes into one
PrefixKV (kv[kind]: (N, L, 2, H_kv, P, D), rows = task ids) for a single forward pass.

Loss: the mean over all target tokens of the batch, as for a single task. Task t's prefix gets
exactly (N_t / N) times the gradient a single-task run on the same rows gives it (N_t: its
target tokens in the batch, N: all). Every prefix is computed every step, so a task absent from
a batch gets a zero gradient (AdamW momentum still moves it); --grad-clip clips the joint norm.

Outputs: out/prefixes/<task>/ (an ordinary folded prefix each) and out/prefixes/index.json;
checkpoints hold out/checkpoint/<task>/encoder.* and tasks.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.core.artifact import (
    load_encoder,
    read_json,
    save_encoder,
    save_prefix,
)
from prefixtune.core.atomic_files import atomic_write_json
from prefixtune.core.attention import PrefixKV
from prefixtune.core.models import model_id
from prefixtune.core.prefix_encoder import PrefixEncoder, build_encoder, hidden_size_of
from prefixtune.data.encoding import Encoded
from prefixtune.data.records import Example
from prefixtune.methods.base import Method
from prefixtune.methods.objective import hidden_states, target_loss

TASK_KEY = "task_ids"
ARTIFACT_DIR = "prefixes"
INDEX_JSON = "index.json"
TASKS_JSON = "tasks.json"
INDEX_FORMAT = "prefixtune-prefix-set"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # a directory name and a ModuleDict key


@dataclass(frozen=True)
class Task:
    """One task of a multi-task run: its name (artifact directory) and dataset spec."""

    name: str
    data: str


@dataclass(frozen=True)
class TaskExample(Example):
    """An Example tagged with its task's index in the run's task list."""

    task: int = 0


@dataclass
class TaskEncoded(Encoded):
    """Encoded ids tagged with their task index."""

    task: int = 0


def is_multitask(config: TrainConfig) -> bool:
    """True for --method multitask or a --data naming several tasks (',' or '=')."""
    return config.method == "multitask" or "," in config.data or "=" in config.data


def parse_tasks(spec: str) -> list[Task]:
    """'e2e,webnlg' or 'e2e=e2e,web=data/web.jsonl' -> tasks (names default to the dataset's)."""
    tasks: list[Task] = []
    for part in (p.strip() for p in spec.split(",")):
        name, sep, data = part.partition("=")
        if not sep:
            name, data = Path(part.rstrip("/")).stem, part
        name, data = name.strip(), data.strip()
        if not data:
            raise ConfigError(f"--data {spec!r}: every task needs a dataset (NAME=DATASET,...)")
        if not _NAME.match(name):
            raise ConfigError(
                f"--data {spec!r}: task name {name!r} must be letters, digits, '_' or '-' "
                "(name it: NAME=DATASET)"
            )
        if any(t.name == name for t in tasks):
            raise ConfigError(f"--data {spec!r}: task name {name!r} given twice (use NAME=DATASET)")
        tasks.append(Task(name, data))
    return tasks


def task_list(config: TrainConfig) -> list[Task]:
    """The run's tasks, or [] for ordinary single-task training."""
    if not is_multitask(config):
        return []
    if config.method not in ("prefix", "multitask"):
        raise ConfigError(
            f"multi-task training (--data {config.data!r}) trains prefixes only; "
            f"--method {config.method!r} is single-task"
        )
    return parse_tasks(config.data)


def tag(examples: list[Example], task: int) -> list[TaskExample]:
    """The examples tagged with task index `task`."""
    return [TaskExample(e.source, e.target, e.references, e.meta, e.messages, task=task)
            for e in examples]  # fmt: skip


def tag_items(items: list[Encoded], examples: list[Example], tasks: int) -> list[TaskEncoded]:
    """Carry each example's task index over to its encoding (same order)."""
    if not all(isinstance(e, TaskExample) for e in examples):
        raise ConfigError("multi-task training needs task-tagged examples (multitask.tag)")
    bad = sorted({e.task for e in examples} - set(range(tasks)))  # type: ignore[attr-defined]
    if bad:
        raise ConfigError(f"example task ids {bad} outside the {tasks} tasks of this run")
    return [
        TaskEncoded(it.input_ids, it.labels, e.task)  # type: ignore[attr-defined]
        for it, e in zip(items, examples, strict=True)
    ]


def with_task_ids(
    collate: Callable[[list[Encoded]], dict[str, Tensor]],
) -> Callable[[list[Encoded]], dict[str, Tensor]]:
    """A collate function that adds batch[TASK_KEY]: (B,) long task ids."""

    def collate_tasks(items: list[Encoded]) -> dict[str, Tensor]:
        batch = collate(items)
        batch[TASK_KEY] = torch.tensor([it.task for it in items], dtype=torch.long)  # type: ignore[attr-defined]
        return batch

    return collate_tasks


class MultiPrefixMethod(Method):
    """One PrefixEncoder per task on one frozen model; each row uses its task's prefix."""

    name = "multitask"
    artifact_dir = ARTIFACT_DIR  # the trainer saves artifacts under out/prefixes/

    def __init__(self, model: PreTrainedModel, encoders: dict[str, PrefixEncoder],
                 tasks: list[Task] | None = None) -> None:  # fmt: skip
        super().__init__(model, nn.ModuleDict(encoders))
        self.encoders: nn.ModuleDict = self.module  # type: ignore[assignment]
        self.tasks = tasks or [Task(name, "") for name in encoders]
        if [t.name for t in self.tasks] != list(encoders):
            raise ValueError("tasks and encoders must list the same names in the same order")

    def prefix_kv(self, rows: Tensor | None = None) -> PrefixKV:
        """Every task's prefix, computed once this step: kind -> (N, L, 2, H_kv, P, D);
        rows (B,) picks each batch row's task."""
        prefixes = [{k: kv[0] for k, kv in enc().kv.items()} for enc in self.encoders.values()]
        return PrefixKV.stack(prefixes, rows)  # kind -> (L, 2, H_kv, P, D) each, stacked

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        hidden = hidden_states(self.model, batch, self.prefix_kv(batch[TASK_KEY]))
        return target_loss(self.model, hidden, batch["labels"])

    def save_checkpoint(self, directory: Path) -> None:
        hidden = hidden_size_of(self.model)
        for name, encoder in self.encoders.items():
            save_encoder(directory / name, encoder, hidden)  # type: ignore[arg-type]
        atomic_write_json(directory / TASKS_JSON, {"tasks": list(self.encoders)})

    def load_checkpoint(self, directory: Path) -> None:
        saved = read_json(directory / TASKS_JSON).get("tasks")
        if saved != list(self.encoders):
            raise ConfigError(
                f"{directory} holds tasks {saved}, but this run trains {list(self.encoders)}"
            )
        for name, encoder in self.encoders.items():
            encoder.load_state_dict(load_encoder(directory / name).state_dict())

    def save_artifact(self, directory: Path, dtype: str = "float32", **meta: Any) -> None:
        """out/prefixes/<task>/ (folded prefixes), then index.json (written last)."""
        base = model_id(self.model)
        entries = []
        for index, task in enumerate(self.tasks):
            encoder: PrefixEncoder = self.encoders[task.name]  # type: ignore[assignment]
            save_prefix(directory / task.name, encoder.bake(), base_model=base,
                        prefix_config=encoder.config, dtype=dtype,
                        extra={**meta, "task": task.name, "data": task.data})  # fmt: skip
            entries.append({"name": task.name, "data": task.data, "task_id": index,
                            "path": task.name})  # fmt: skip
        index = {"format": INDEX_FORMAT, "version": 1, "base_model": base, "tasks": entries, **meta}
        atomic_write_json(directory / INDEX_JSON, index)


def build(model, tokenizer, prefix: PrefixConfig, seed: int = 0,
               tasks: list[Task] | list[str] = (), **_: Any) -> MultiPrefixMethod:  # fmt: skip
    """Task i's encoder is initialised with seed + i (task 0 = the single-task run's init)."""
    if not tasks:
        raise ConfigError("--method multitask needs tasks: --data NAME=DATASET,NAME=DATASET")
    tasks = [t if isinstance(t, Task) else Task(t, "") for t in tasks]
    encoders = {t.name: build_encoder(model, prefix, tokenizer, seed=seed + i)
                for i, t in enumerate(tasks)}  # fmt: skip
    return MultiPrefixMethod(model, encoders, tasks)
