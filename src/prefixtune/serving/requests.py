"""What the scheduler takes and gives: a request (prompt ids, prefix, decoding settings, its future),
its result, and the errors a submitter can meet."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from prefixtune.config import GenerateConfig


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


class QueueFull(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


class RequestFailed(RuntimeError):
    """This request alone failed (e.g. non-finite logits from its prefix); others went on."""


@dataclass
class Request:
    """One generation request in token ids (the scheduler never sees text)."""

    prompt: list[int]
    prefix: str | None
    config: GenerateConfig
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    started: float = 0.0
    batch_rows: int = 0  # rows in the batch it started in
    cancelled: bool = False  # set by Scheduler.cancel; the worker drops it before its next step
    on_token: Callable[[int, Any], None] | None = None  # worker thread: (token, logprobs or None)
    logprobs: int | None = None  # top-k log-probabilities handed to on_token (None: none)


@dataclass
class Result:
    """New token ids (no prompt, no EOS) and how the request went."""

    tokens: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    queued_s: float  # arrival -> start of its batch
    total_s: float  # arrival -> result
    batch_rows: int  # rows in the batch when it started (running rows included)


def finish_reason_of(tokens: list[int], config: GenerateConfig) -> str:
    return "length" if len(tokens) >= config.max_new_tokens else "stop"
