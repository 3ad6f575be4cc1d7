"""The scheduler: collects concurrent requests into batches and runs them on one worker thread.

Requests arrive from any thread (`submit` returns a `concurrent.futures.Future`). One worker
thread owns the model:

* Continuous batching (decoder-only models whose KV cache can hold the prefixes): greedy and
  sampling requests join the running batch between decode steps, whatever their prefix or
  options, up to `max_batch_size` rows; finished rows leave at once (continuous.py).
* Request-level dynamic batching (beam search everywhere; every request on encoder-decoder or
  sliding-window models): requests with identical decoding options and prefix kinds form one
  group of up to `max_batch_size`, prefixes mixed per row, decoded step by step (beam_group.py)
  with generate()'s numbers.

Isolation and fairness: every worker cycle runs one decode step of the continuous batch and then
one step of each active group (at most `max_groups` at a time), so a long beam search delays a
greedy row by one beam step per token instead of its whole run. A row whose logits are not
finite, or whose token choice raises, fails alone (`RequestFailed`); `cancel()` takes a request
out of the queue, or out of its batch or group before the next step.

When the worker is idle it waits up to `max_wait_ms` after the first arrival for more requests
(or until `max_batch_size` are waiting) before it starts. `close()` stops intake and lets the
worker finish everything already accepted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

import torch
from transformers import PreTrainedModel

from prefixtune.config import GenerateConfig
from prefixtune.core.runtime import compiled_for_decoding
from prefixtune.generation.beam_group import GroupRun
from prefixtune.generation.continuous import Row, RunningBatch
from prefixtune.generation.prefill import eval_mode, full_attention_decoder, pad_prompts
from prefixtune.serving.bank import PrefixBank, UnknownPrefixError
from prefixtune.serving.requests import (
    QueueFull,
    Request,
    RequestFailed,
    Result,
    SchedulerClosed,
    finish_reason_of,
)

log = logging.getLogger(__name__)


class Scheduler:
    """Batches requests over a bank of prefixes for one frozen model (one worker thread)."""

    def __init__(
        self,
        model: PreTrainedModel,
        bank: PrefixBank,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 1024,
        continuous: bool | None = None,
        compile: bool = False,
        max_groups: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1 or max_groups < 1:
            raise ValueError(
                "max_batch_size, max_queue and max_groups must be >= 1, max_wait_ms >= 0"
            )
        self.model, self.bank = model, bank
        self.compile = compile  # decode under torch.compile (generate --compile)
        self._runner = compiled_for_decoding(model) if compile else model
        self.eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad_token_id = pad_token_id
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue, self.max_groups = max_queue, max_groups
        can = full_attention_decoder(model)
        if continuous and not can:
            raise ValueError("continuous batching needs a decoder-only model without "
                             "sliding-window layers")  # fmt: skip
        self.continuous = can if continuous is None else continuous
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = RunningBatch(self._runner, self.eos_ids)
        self._groups: list[tuple[GroupRun, list[Request]]] = []  # request-level, stepping
        self._started: dict[Future, Request] = {}  # claimed, not yet answered
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "batches": 0, "decode_steps": 0, "group_steps": 0,
                         "failed": 0, "cancelled": 0}  # fmt: skip

    # ------------------------------------------------------------------ public
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prefixtune-scheduler",
                                            daemon=True)  # fmt: skip
            self._thread.start()
        return self

    def submit(self, prompt: list[int], prefix: str | None, config: GenerateConfig, *,
               on_token: Callable[[int, Any], None] | None = None,
               logprobs: int | None = None) -> Future:  # fmt: skip
        """Queue a request; its Future resolves to a Result (or raises).

        `on_token(token, info)` is called on the worker thread for each new token of a
        continuous-batch row as it is decoded, before the Future resolves (beam groups deliver
        tokens only in the Result); `info` is None, or with `logprobs=k` the pair (log-probability
        of the token, [(id, log-probability)] of the k most likely), from the raw logits."""
        request = Request(list(prompt), prefix, config, on_token=on_token, logprobs=logprobs)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests waiting (limit {self.max_queue})")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def cancel(self, future: Future) -> bool:
        """Abandon the request behind `future` (e.g. its client disconnected).

        A waiting request leaves the queue and its Future is cancelled at once. A running one
        leaves its continuous batch or beam group before the next decode step; its Future then
        raises `concurrent.futures.CancelledError`. Returns True when the request was waiting or
        running, False when it had already finished or is unknown (a result may still win a
        race with a cancel of a request on its last step)."""
        with self._cond:
            for request in self._pending:
                if request.future is future:
                    self._pending.remove(request)
                    self.counters["cancelled"] += 1
                    return future.cancel()
            request = self._started.get(future)
            if request is None or future.done():
                return False
            request.cancelled = True
            self._cond.notify()
            return True

    def close(self, timeout: float | None = None) -> bool:
        """Take no new requests, finish the accepted ones; True when the worker has stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        with self._cond:  # never started: nothing will run what is waiting
            self._fail(list(self._pending), SchedulerClosed("the server is shutting down"))
            self._pending.clear()
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "mode": "continuous" if self.continuous else "dynamic",
            "waiting": len(self._pending),
            "running": len(self._running),
            "groups": len(self._groups),
            "group_rows": sum(run.size for run, _ in list(self._groups)),
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait * 1000.0,
            **self.counters,
        }

    def prefix_ids(self) -> tuple[list[str | None], list[str | None]]:
        """The prefixes of the running requests and of the waiting ones (for /metrics)."""
        with self._cond:
            return [r.prefix for r in self._started.values()], [r.prefix for r in self._pending]

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._busy():
                    if self._closed:
                        return
                    self._cond.wait()
                    continue
                if not self._busy():
                    self._wait_for_batch()
                joiners, group = self._take()
            try:
                with torch.inference_mode(), eval_mode(self.model):
                    self._drop_cancelled()
                    self._admit(joiners)
                    self._start_group(group)
                    self._decode_step()
                    self._step_groups()
            except Exception as err:  # never leave callers waiting on a dead worker
                log.exception("scheduler step failed")
                grouped = [r for _, requests in self._groups for r in requests]
                running = [row.tag for row in self._running.rows]
                self._fail(joiners + group + running + grouped, err)
                self._running = RunningBatch(self._runner, self.eos_ids)
                self._groups = []

    def _busy(self) -> bool:
        """Rows decoding in the continuous batch or in a request-level group."""
        return bool(len(self._running) or self._groups)

    def _wait_for_batch(self) -> None:
        """Idle: wait (lock held by the caller) until max_batch_size requests are waiting or
        max_wait has passed since the oldest arrived, or shutdown begins."""
        deadline = self._pending[0].arrived + self.max_wait
        while len(self._pending) < self.max_batch_size and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _steppable(self, request: Request) -> bool:
        return self.continuous and request.config.num_beams == 1

    def _take(self) -> tuple[list[Request], list[Request]]:
        """Pop (rows that join the running batch, one generate() group) from the queue."""
        room = self.max_batch_size - len(self._running)
        can_group = len(self._groups) < self.max_groups
        joiners, group, key, kept = [], [], None, deque()
        while self._pending:
            request = self._pending.popleft()
            if self._steppable(request) and len(joiners) < room:
                joiners.append(request)
            elif (
                not self._steppable(request)
                and can_group
                and len(group) < self.max_batch_size
                and (key is None or self._group_key(request) == key)
            ):
                key = self._group_key(request)
                group.append(request)
            else:
                kept.append(request)
        self._pending = kept
        return self._claim(joiners), self._claim(group)

    def _group_key(self, request: Request) -> tuple:
        try:
            kinds = self.bank.kinds_of(request.prefix)
        except UnknownPrefixError:
            kinds = ()
        return dataclasses.astuple(request.config), kinds

    def _claim(self, requests: list[Request]) -> list[Request]:
        """Drop cancelled requests; mark the others as started."""
        now = time.monotonic()
        claimed = [r for r in requests if r.future.set_running_or_notify_cancel()]
        for request in claimed:
            request.started = now
            self._started[request.future] = request
        return claimed

    def _known(self, requests: list[Request]) -> list[Request]:
        """Fail requests whose prefix was removed after they were accepted."""
        known = []
        for request in requests:
            if request.prefix is None or request.prefix in self.bank:
                known.append(request)
            else:
                self._fail([request], UnknownPrefixError(request.prefix))
        return known

    def _fail(self, requests: list[Request], err: BaseException) -> None:
        for request in requests:
            self._started.pop(request.future, None)
            if not request.future.done():
                self.counters["failed"] += 1
                request.future.set_exception(err)

    def _cancelled(self, requests: list[Request]) -> None:
        """Answer requests dropped by cancel() with CancelledError."""
        self.counters["cancelled"] += len(requests)
        for request in requests:
            self._started.pop(request.future, None)
            if not request.future.done():
                request.future.set_exception(CancelledError("the request was cancelled"))

    def _resolve(self, request: Request, tokens: list[int], rows: int) -> None:
        now = time.monotonic()
        reason = finish_reason_of(tokens, request.config)
        result = Result(tokens, reason, request.started - request.arrived, now - request.arrived,
                        rows)  # fmt: skip
        self.counters["requests"] += 1
        self._started.pop(request.future, None)
        if not request.future.done():
            request.future.set_result(result)

    def _admit(self, requests: list[Request]) -> None:
        """Prefill newcomers and merge them into the running batch."""
        requests = self._known(requests)
        if not requests:
            return
        rows = [Row(r.prompt, r.config, tag=r) for r in requests]
        try:
            prefix = self.bank.gather([r.prefix for r in requests])
            self._running.add(rows, prefix, self.pad_token_id)
        except Exception as err:  # a failed prefill must not take the worker down
            log.exception("prefill failed")
            self._fail(requests, err)
            return
        self.counters["batches"] += 1
        for row in rows:
            row.tag.batch_rows = len(self._running)

    def _decode_step(self) -> None:
        if not len(self._running):
            return
        watched = self._watched()
        try:
            finished = self._running.step()
        except Exception as err:
            log.exception("decode step failed")
            self._fail([row.tag for row in self._running.rows], err)
            self._running = RunningBatch(self._runner, self.eos_ids)
            return
        self.counters["decode_steps"] += 1
        _emit(watched)
        for row in finished:
            if row.stop == "error":
                self._fail([row.tag], RequestFailed(row.error))
            else:
                self._resolve(row.tag, row.tokens, row.tag.batch_rows)

    def _watched(self) -> list[tuple[Row, int, torch.Tensor | None]]:
        """Rows with a token callback: (row, tokens so far, log-probabilities (V,) or None)."""
        watched = []
        for i, row in enumerate(self._running.rows):
            if row.tag.on_token is not None:
                scores = None
                if row.tag.logprobs is not None:
                    scores = torch.log_softmax(self._running.logits[i].float(), -1)
                watched.append((row, len(row.tokens), scores))
        return watched

    def _drop_cancelled(self) -> None:
        """Take cancelled requests out of the continuous batch and the groups."""
        gone = [row for row in self._running.rows if row.tag.cancelled]
        if gone:
            self._running.remove(gone)
            self._cancelled([row.tag for row in gone])
        for run, requests in self._groups:
            drop = {i for i in run.active if requests[i].cancelled}
            if drop:
                run.drop(drop)
                self._cancelled([requests[i] for i in sorted(drop)])
        self._groups = [(run, requests) for run, requests in self._groups if not run.done]

    def _start_group(self, requests: list[Request]) -> None:
        """Prefill one group with identical options; it then advances in `_step_groups`."""
        requests = self._known(requests)
        if not requests:
            return
        try:
            prefix = self.bank.gather([r.prefix for r in requests])
            ids, mask = pad_prompts(self.model, [r.prompt for r in requests], self.pad_token_id)
            run = GroupRun(self.model, self._runner, ids, mask, prefix, requests[0].config,
                           eos_token_ids=self.eos_ids, pad_token_id=self.pad_token_id)  # fmt: skip
        except Exception as err:
            log.exception("group prefill failed")
            self._fail(requests, err)
            return
        self.counters["batches"] += 1
        for request in requests:
            request.batch_rows = len(requests)
        self._groups.append((run, requests))

    def _step_groups(self) -> None:
        """One step of every active group; answer the inputs that finished or failed."""
        for entry in list(self._groups):
            run, requests = entry
            try:
                run.step()
            except Exception as err:  # fails this group only
                log.exception("group step failed")
                self._groups.remove(entry)
                self._fail([requests[i] for i in run.active], err)
                continue
            self.counters["group_steps"] += 1
            for i, message in run.errors.items():
                self._fail([requests[i]], RequestFailed(message))
            for i, tokens in run.results.items():
                self._resolve(requests[i], tokens, len(requests))
            run.errors.clear()
            run.results.clear()
            if run.done:
                self._groups.remove(entry)


def _emit(watched: list[tuple[Row, int, torch.Tensor | None]]) -> None:
    """Hand each watched row's new token (and its log-probabilities) to its callback."""
    for row, before, scores in watched:
        for token in row.tokens[before:]:
            info = None
            if scores is not None:
                values, ids = scores.topk(row.tag.logprobs or 0)
                pairs = list(zip(ids.tolist(), values.tolist(), strict=True))
                info = (float(scores[token]), pairs)
            try:
                row.tag.on_token(token, info)
            except Exception:  # a reader's failure must not stop the batch
                log.exception("token callback failed")
