"""One decoding path for every generation route (/v1/generate, /v1/completions, chat): a row's
tokens arrive on the event loop as the continuous batch decodes them, are detokenised
incrementally (never splitting a multi-byte character), cut at stop strings (the row then leaves
the batch), and the row is cancelled when its client goes away or a drain times out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException

from prefixtune.config import GenerateConfig
from prefixtune.serving.bank import UnknownPrefixError
from prefixtune.serving.requests import QueueFull, RequestFailed, SchedulerClosed

_DONE = object()  # the queue's end marker: the scheduler's Future has resolved


@dataclass
class TokenInfo:
    """One generated token: its id, text offset and (when asked) log-probabilities."""

    token: int
    offset: int  # where its text starts in the choice's text
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """Text that became final since the last delta, and the tokens that arrived meanwhile."""

    text: str
    tokens: list[TokenInfo]


class Detokenizer:
    """The text of a growing token list, released piece by piece: only whole characters, and
    never a tail that may still grow into a stop string. Once a stop string appears the text ends
    just before it (`stopped`)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False
        self._full = ""  # the last decode that ended on a whole character

    def push(self, token: int) -> tuple[str, int]:
        """Add a token; returns (newly released text, the token's text offset)."""
        offset = len(self._full)
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return "", offset
        self._full = full
        return self._release(full, final=False), offset

    def finish(self) -> str:
        """Release whatever is left (a trailing partial character included)."""
        self._full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._release(self._full, final=True)

    def _release(self, full: str, final: bool) -> str:
        if self.stopped:
            return ""
        start, cut = len(self.text), len(full)
        for stop in self.stops:
            at = full.find(stop, start)
            if at >= 0 and at < cut:
                cut, self.stopped = at, True
        if not self.stopped and not final:
            cut -= self._held(full, start)
        new = full[start:cut] if cut > start else ""
        self.text += new
        return new

    def _held(self, full: str, start: int) -> int:
        """Length of the longest tail of `full` (after `start`) that begins a stop string."""
        for k in range(min(max(map(len, self.stops), default=1) - 1, len(full) - start), 0, -1):
            if any(stop.startswith(full[-k:]) for stop in self.stops):
                return k
        return 0


def submit(server: Any, prompt: list[int], prefix: str | None, config: GenerateConfig,
           *, busy_status: int = 503, **options: Any):  # fmt: skip
    """Queue one row; 429/503 (with Retry-After) when the queue is full, 503 when closing."""
    try:
        return server.scheduler.submit(prompt, prefix, config, **options)
    except QueueFull as err:
        raise HTTPException(busy_status, f"server busy: {err}", {"Retry-After": "1"}) from None
    except SchedulerClosed as err:
        raise HTTPException(503, str(err), {"Retry-After": "1"}) from None


class RowStream:
    """One row in the scheduler, read on the event loop as it decodes (`deltas()`)."""

    def __init__(self, server: Any, prompt: list[int], prefix: str | None,
                 config: GenerateConfig, *, stops: list[str] | None = None,
                 logprobs: int | None = None, busy_status: int = 503,
                 on_first_token: Callable[[], None] | None = None) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        self.server, self.prefix, self.logprobs = server, prefix, logprobs
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

        self.future = submit(server, prompt, prefix, config, busy_status=busy_status,
                             on_token=lambda token, info: put((token, info)),
                             logprobs=logprobs)  # fmt: skip
        self.future.add_done_callback(lambda _: put(_DONE))
        self.detok = Detokenizer(server.tokenizer, stops or [])
        self.prompt_tokens = len(prompt)
        self.finish_reason = ""
        self.first_token_at: float | None = None
        self.on_first_token = on_first_token

    @property
    def completion_tokens(self) -> int:
        return len(self.detok.tokens)

    def cancel(self) -> None:
        """Take the row out of the batch (or the queue) before the next step."""
        if not self.future.done():
            self.server.scheduler.cancel(self.future)

    async def deltas(self) -> AsyncIterator[Delta]:
        """New text as the batch decodes it; `finish_reason` is set when it ends. A client that
        stops reading (disconnect, task cancelled) cancels the row."""
        try:
            while True:
                item = await self.queue.get()
                if item is _DONE:
                    yield self._last()
                    return
                delta = self._push([item])
                if self.detok.stopped:  # a stop string: the row leaves the batch now
                    self.cancel()
                    self.finish_reason = "stop"
                    yield delta
                    return
                if delta.text or delta.tokens:
                    yield delta
        finally:
            self.cancel()

    def _push(self, items: list[tuple[int, Any]]) -> Delta:
        if items and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            if self.on_first_token is not None:
                self.on_first_token()
        text, infos = "", []
        for token, info in items:
            piece, offset = self.detok.push(token)
            text += piece
            logprob, top = info if info is not None else (None, [])
            infos.append(TokenInfo(token, offset, logprob, top))
        return Delta(text, infos)

    def _last(self) -> Delta:
        """The final delta from the resolved Future (beam groups deliver all tokens here)."""
        result = self._result()
        if result is None:  # cancelled on the server's side (a stop string won the race)
            delta = Delta(self.detok.finish(), [])
        else:
            done = len(self.detok.tokens)
            delta = self._push([(t, None) for t in result.tokens[done:]])
            if not self.detok.stopped:
                delta.text += self.detok.finish()
        self.finish_reason = "stop" if self.detok.stopped else (
            result.finish_reason if result is not None else "stop")  # fmt: skip
        return delta

    def _result(self) -> Any:
        """The scheduler's Result, or an HTTPException for how the row ended instead."""
        try:
            return self.future.result()
        except (CancelledError, asyncio.CancelledError):
            stopping = self.server.stopping
            if self.detok.stopped:
                return None
            if stopping is not None and stopping.is_set():
                raise HTTPException(503, "the server shut down before this request finished; "
                                         "retry", {"Retry-After": "1"}) from None  # fmt: skip
            raise ClientGone from None
        except UnknownPrefixError:
            raise HTTPException(404, f"prefix {self.prefix!r} was unloaded while this request "
                                     "waited") from None  # fmt: skip
        except RequestFailed as err:
            raise HTTPException(500, f"this request failed alone: {err}") from None


class ClientGone(Exception):
    """The client disconnected; nobody reads the reply."""


async def watched(server: Any, request: Any, streams: list[RowStream], work: Any) -> Any:
    """Await `work` (a coroutine reading `streams`); a client disconnect or a timed-out drain
    cancels every row (they leave the batch at the next step). Raises ClientGone or 503."""
    task = asyncio.ensure_future(work)
    watchers = [asyncio.ensure_future(disconnected(request))]
    if server.stopping is not None:
        watchers.append(asyncio.ensure_future(server.stopping.wait()))
    try:
        done, _ = await asyncio.wait([task, *watchers], return_when="FIRST_COMPLETED")
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        for watcher in watchers:
            watcher.cancel()
    if task in done:
        return task.result()
    for stream in streams:  # rows leave the batch; the reader then ends
        stream.cancel()
    with contextlib.suppress(ClientGone, HTTPException, asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    if watchers[0] in done:
        raise ClientGone
    raise HTTPException(503, "the server shut down before this request finished; retry",
                        {"Retry-After": "1"})  # fmt: skip


async def disconnected(request: Any) -> None:
    """Returns when the client has gone (the body has been read; only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(stream: RowStream) -> tuple[str, list[TokenInfo]]:
    """The whole text and tokens of a row (non-streamed replies)."""
    text, tokens = "", []
    async for delta in stream.deltas():
        text += delta.text
        tokens += delta.tokens
    return text, tokens


async def merged(streams: list[RowStream]) -> AsyncIterator[tuple[int, Delta | None]]:
    """(choice index, delta) from every stream as they decode; (index, None) when one ends."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RowStream) -> None:
        try:
            async for delta in stream.deltas():
                await out.put((index, delta, None))
            await out.put((index, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - handed to the reader
            await out.put((index, None, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, delta, err = await out.get()
            if err is not None:
                raise err
            left -= delta is None
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()
