"""Training: setup -> fit -> validate -> save; resume. A plain PyTorch loop.

Outputs under config.out:
    prefix/        the folded artifact (best dev loss; the last step without a dev split)
    checkpoint/    resumable state (written every --checkpoint-every steps and at the end)
    log.jsonl      one JSON line per logged step and per evaluation
    run.json       config, data hash, versions, time, final dev loss, trainable parameters
Multi-task runs (--data NAME=DATASET,...; see multitask.py) write prefixes/<task>/ + index.json
instead of prefix/. Under torchrun the run is data-parallel (see distributed.py); rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from prefixtune._version import __version__
from prefixtune.config import ConfigError, PrefixConfig, TrainConfig, to_dict
from prefixtune.core.atomic_files import atomic_write_json
from prefixtune.core.fuse import fuse_projections
from prefixtune.core.models import load_model
from prefixtune.core.quantize import quantize_base
from prefixtune.core.runtime import (
    autocast_context,
    autocast_dtype,
    compiled,
    enable_gradient_checkpointing,
    resolve_device,
)
from prefixtune.data.encoding import (
    Encoded,
)
from prefixtune.data.records import Example
from prefixtune.methods.base import Method
from prefixtune.methods.multitask import task_list
from prefixtune.methods.objective import count_tokens, target_positions
from prefixtune.methods.registry import build_method
from prefixtune.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from prefixtune.training.distributed import Distributed, from_env
from prefixtune.training.fsdp import shard_for_run
from prefixtune.training.prepare import check_longest, prepare_data
from prefixtune.training.tracking import Tracker
from prefixtune.training.weight_cast import frozen_weights_in

log = logging.getLogger(__name__)
ARTIFACT_DIR = "prefix"


def position_offset(method: Method) -> int:
    """Positions the method puts before the real tokens: its prefix or infix length (the longest
    task's in a multi-task run), its virtual tokens (prompt tuning), else 0."""
    prefix_kv = getattr(method, "prefix_kv", None)
    if prefix_kv is not None:
        with torch.no_grad():
            return max((t.shape[-2] for t in prefix_kv().kv.values()), default=0)
    virtual = getattr(method.module, "embeddings", None)  # VirtualTokens: (n, d)
    return int(virtual.shape[0]) if isinstance(virtual, torch.nn.Parameter) else 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def dev_sums(
    method: Method, batches: list[dict[str, torch.Tensor]], amp, device
) -> tuple[float, int]:
    """(sum of per-token losses, target tokens) over the dev batches."""
    method.eval()
    total, count = 0.0, 0
    for batch in batches:
        _, targets = count_tokens(batch)
        with autocast_context(amp, device):
            total += method.loss(to_device(batch, device)).item() * targets
        count += targets
    method.train()
    return total, count


def dev_loss(method: Method, batches: list[dict[str, torch.Tensor]], amp, device) -> float:
    """Target-token-weighted mean loss over the dev batches."""
    total, count = dev_sums(method, batches, amp, device)
    return total / max(count, 1)


def linear_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Holds the run's state; `fit()` trains, evaluates, checkpoints and saves."""

    def __init__(self, config: TrainConfig, prefix: PrefixConfig, *, model=None, tokenizer=None,
                 train_examples: list[Example] | None = None,
                 dev_examples: list[Example] | None = None,
                 dist: Distributed | None = None) -> None:  # fmt: skip
        """Multi-task runs take examples tagged with multitask.tag(); `dist` defaults to the
        torchrun job this process is part of (None: single process)."""
        self.config, self.prefix_config = config, prefix
        self.out = Path(config.out)
        self.tasks = task_list(config)
        self.dist = dist if dist is not None else from_env(config.device)
        self.device = self.dist.device if self.dist else resolve_device(config.device)
        self.amp = autocast_dtype(config.autocast, self.device)
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = load_model(config.model or None, device=str(self.device))
        self.model, self.tokenizer = model, tokenizer
        quantize_base(model, config.quantize, config.method)  # --quantize int8/int4
        options = {"tasks": self.tasks} if self.tasks else {}
        self.method = build_method("multitask" if self.tasks else config.method, model, tokenizer,
                                   prefix, seed=config.seed, adapter_share=config.adapter_share,
                                   **options)  # fmt: skip
        data = prepare_data(config, model, tokenizer, self.tasks, train_examples, dev_examples,
                            offset=position_offset(self.method))  # fmt: skip
        self.data_hash, self.batches, self.dev_batches = (
            data.data_hash,
            data.batches,
            data.dev_batches,
        )
        self.chat_meta = data.chat  # chat data: the template and system default inference reuses
        self.artifact_dir = self.out / getattr(self.method, "artifact_dir", ARTIFACT_DIR)
        self._check_positions(data.train_items, data.train_examples, "training")
        self._check_positions(data.dev_items, data.dev_examples, "dev")
        self.method.module.to(self.device)
        if config.fuse_projections:  # after the method froze (or refused to freeze) the base
            fuse_projections(model)
        if config.shard_base:  # FSDP2 over the frozen blocks (training/fsdp.py)
            shard_for_run(model, self.dist, config)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.loss = compiled(self.method.loss, self.device) if config.compile else self.method.loss
        self.optimizer = torch.optim.AdamW(self.method.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)  # fmt: skip
        # micro-batches the run trains on: --max-steps full steps, else the epochs' real batches
        accum = config.grad_accum
        self.micro_batches = config.max_steps * accum or self.batches.total(config.epochs)
        self.total_steps = max(1, math.ceil(self.micro_batches / accum))
        self.scheduler = linear_schedule(self.optimizer, config.warmup_steps, self.total_steps)
        self.state: dict[str, Any] = {"step": 0, "best_dev": math.inf, "dev_history": []}
        self.tracker = Tracker(config.report_to, self.out, enabled=self.is_main)  # --report-to

    def _check_positions(self, items: list[Encoded], examples: list[Example], split: str) -> None:
        """Refuse, before training, an example that would run past the model's positions once
        the method's prefix (or virtual tokens) offsets them; names the longest one."""
        check_longest(self.model, items, examples, position_offset(self.method),
                      lambda i: f"{split} example {i + 1} of {len(items)} in {self.config.data}")  # fmt: skip

    def _restore_or_refuse(self) -> None:
        found = find_checkpoint(self.out)
        if found is None:
            return
        if not self.config.resume:
            raise ConfigError(
                f"{self.out} already holds a checkpoint: pass --resume to continue it, "
                "or choose another --out"
            )
        self.state = load_checkpoint(found, self.method, self.optimizer, self.scheduler)
        log.info("resumed from %s at step %d", found, self.state["step"])

    @property
    def is_main(self) -> bool:
        """True on the process that writes (rank 0, or the only one)."""
        return self.dist is None or self.dist.is_main

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.tracker.log(record)

    def _evaluate(self, step: int) -> float | None:
        if not self.dev_batches:
            return None
        if self.dist and not self.dist.lockstep:  # each rank scores every world-th dev batch
            mine = self.dev_batches[self.dist.rank :: self.dist.world]
            total, count = self.dist.all_reduce_sum(
                list(dev_sums(self.method, mine, self.amp, self.device))
            )
            loss = total / max(count, 1)
        else:
            loss = dev_loss(self.method, self.dev_batches, self.amp, self.device)
        self.state["dev_history"].append((step, loss))
        self._log({"step": step, "dev_loss": loss})
        if loss < self.state["best_dev"]:
            self.state["best_dev"] = loss
            if self.is_main:
                self._save_artifact(step=step, dev_loss=loss)
        return loss

    def _out_of_patience(self) -> bool:
        """True once the last `patience` dev evaluations all came after the best one."""
        patience, history = self.config.patience, self.state["dev_history"]
        if not patience or not history:
            return False
        best = min(range(len(history)), key=lambda i: history[i][1])
        return len(history) - 1 - best >= patience

    def _save_artifact(self, **meta: Any) -> None:
        """The loadable result, with the prompt format that inference must reuse."""
        self.method.save_artifact(self.artifact_dir, dtype=self.config.save_dtype,
                                  separator=self.config.separator, **self.chat_meta,
                                  **meta)  # fmt: skip

    def _checkpoint(self, step: int) -> None:
        if not self.is_main:
            return
        extra = {k: v for k, v in self.state.items() if k != "step"}
        save_checkpoint(
            self.out, self.method, self.optimizer, self.scheduler, step=step, extra=extra
        )

    def _train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; returns (loss, tokens)."""
        accum = self.config.grad_accum
        micros = range(step * accum, min((step + 1) * accum, self.micro_batches))
        total_loss, tokens = 0.0, 0
        for micro in micros:
            batch, weight = self.batches.get(micro), 1.0
            tokens += count_tokens(batch)[0]  # the global batch's tokens
            if self.dist:  # this rank's rows; weight = its share N_r / N of the target tokens
                batch, weight = self.dist.shard(batch, self._count_targets)
                if weight == 0.0 and not self.dist.lockstep:  # lockstep: FSDP needs every rank
                    continue
            batch = to_device(batch, self.device)
            with autocast_context(self.amp, self.device):
                loss = self.loss(batch)
                if weight != 1.0:
                    loss = loss * weight
                loss = loss / len(micros)  # the run's last step may hold fewer
            loss.backward()
            total_loss += loss.item()
        if self.dist:  # sum of the ranks' weighted grads = the global batch's gradient
            total_loss = self.dist.all_reduce_grads(self.method.parameters(), total_loss)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def _ends_epoch(self, done: int) -> bool:
        """True when optimizer step `done` (1-based) trains the last micro-batch of an epoch."""
        accum = self.config.grad_accum
        return self.batches.epoch_of(done * accum) > self.batches.epoch_of((done - 1) * accum)

    def _evaluation_due(self, done: int) -> bool:
        """Every --eval-every steps, else at the end of each epoch."""
        if self.config.eval_every:
            return done % self.config.eval_every == 0
        return self._ends_epoch(done)

    def _count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens the loss averages over (the denominator of its mean)."""
        return int(target_positions(self.model, batch["labels"])[1].numel())

    def fit(self) -> dict[str, Any]:
        """Train to the end; returns the run summary (also written to run.json). Under bf16
        autocast the frozen linear weights are stored in bf16 meanwhile (lowprec)."""
        try:
            with frozen_weights_in(self.model, self.amp):
                return self._fit()
        finally:
            self.tracker.close()  # flushed at the end and on failure

    def _fit(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._restore_or_refuse()
        if self.dist:  # every rank starts from rank 0's parameters, after every rank restored
            self.dist.broadcast_parameters(self.method.parameters())
            self.dist.barrier()
        config, start = self.config, self.state["step"]
        if start == 0 and self.dev_batches:
            self.state["initial_dev_loss"] = self._evaluate(0)
        self.method.train()
        stopped = 0 < start < self.total_steps and self._out_of_patience()  # resumed after a stop
        bar = tqdm(range(start, start if stopped else self.total_steps), initial=start,
                   total=self.total_steps,
                   desc="train", disable=not (config.progress and self.is_main),
                   dynamic_ncols=True)  # fmt: skip
        began, tokens_seen, loss = time.perf_counter(), 0, math.nan
        earlier = self.state.get("seconds", 0.0)  # spent before a resume

        def elapsed() -> float:
            return earlier + time.perf_counter() - began

        last = start  # the last step trained
        for step in bar:
            loss, tokens = self._train_step(step)
            tokens_seen += tokens
            rate = tokens_seen / max(time.perf_counter() - began, 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
            done = last = step + 1
            if done % config.log_every == 0 or done == self.total_steps:
                lr = self.scheduler.get_last_lr()[0]
                self._log({"step": done, "loss": loss, "lr": lr, "tokens_per_s": rate})
            if done != self.total_steps and self._evaluation_due(done):
                self._evaluate(done)
                if self._out_of_patience():
                    stopped = True
                    self._log({"step": done, "stopped": f"no dev improvement in {config.patience}"
                               " evaluations"})  # fmt: skip
                    break
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                self.state.update(step=done, seconds=elapsed())
                self._checkpoint(done)
        bar.close()
        if stopped:
            final_dev = self.state["dev_history"][-1][1]
        else:
            final_dev = self._evaluate(self.total_steps)
        if final_dev is None and self.is_main:
            self._save_artifact(step=self.total_steps)
        rate = tokens_seen / max(time.perf_counter() - began, 1e-9)  # this process's part
        # an early stop checkpoints where it stopped: a resume with more patience goes on from there
        self.state.update(step=last, seconds=elapsed(), stopped_at=last if stopped else None)
        self._checkpoint(last)
        summary = self._write_summary(final_dev, loss, self.state["seconds"], rate)
        if self.dist:  # nobody leaves before rank 0 has written everything
            self.dist.barrier()
        return summary

    def _write_summary(self, final_dev, last_loss, seconds, rate) -> dict[str, Any]:
        """run.json; `seconds` counts every resumed part, `rate` this process's tokens/s."""
        trainable, base = self.method.num_trainable(), self.method.num_base()
        summary = {
            "train_config": to_dict(self.config),
            "prefix_config": to_dict(self.prefix_config),
            "data_hash": self.data_hash,
            "train_examples": (  # streamed: one pass's (None before a whole pass)
                self.batches.n_examples
                if hasattr(self.batches, "n_examples")
                else len(self.batches.items)
            ),
            "steps": self.total_steps,
            "initial_dev_loss": self.state.get("initial_dev_loss"),
            "final_dev_loss": final_dev,
            "best_dev_loss": None if math.isinf(self.state["best_dev"]) else self.state["best_dev"],
            "stopped_early_at": self.state.get("stopped_at"),
            "artifact": self.artifact_dir.name,  # in the run directory: prefix/ or prefixes/
            "last_train_loss": last_loss,
            "trainable_parameters": trainable,
            "trainable_share": trainable / base,
            "seconds": seconds,
            "tokens_per_second": rate,
            "autocast": str(self.amp) if self.amp else "float32",
            "device": str(self.device),
            "versions": {
                "prefixtune": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },  # fmt: skip
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.dist:
            summary["world_size"] = self.dist.world
        summary.update(self.chat_meta)  # chat data: chat_template, system
        if self.tasks:
            counts = [
                sum(it.task == i for it in self.batches.items) for i in range(len(self.tasks))
            ]
            summary["tasks"] = [{"name": t.name, "data": t.data, "train_examples": n}
                                for t, n in zip(self.tasks, counts, strict=True)]  # fmt: skip
        if self.is_main:
            atomic_write_json(self.out / "run.json", summary)
        return summary


def train(config: TrainConfig, prefix: PrefixConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train one run end to end (see Trainer for the keyword overrides used by tests)."""
    trainer = Trainer(config, prefix or PrefixConfig(), **kwargs)
    try:
        return trainer.fit()
    finally:
        if trainer.dist:
            trainer.dist.close()
