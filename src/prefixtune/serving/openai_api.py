"""The OpenAI-compatible routes: GET /v1/models, POST /v1/completions and
POST /v1/chat/completions (plain or streamed as server-sent events), over the same decoding path
as /v1/generate (decoding.py): every prompt x n choice is one row of the mixed batch, `model`
names the prefix (or the base model). docs/SERVING.md describes the fields."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from prefixtune.config import GenerateConfig
from prefixtune.data.chat import with_system
from prefixtune.data.chat_encoding import chat_prompt_ids, chat_template_of
from prefixtune.data.records import DataError
from prefixtune.serving.bank import UnknownPrefixError
from prefixtune.serving.decoding import (
    ClientGone,
    RowStream,
    TokenInfo,
    disconnected,
    merged,
    watched,
)
from prefixtune.serving.openai_replies import (
    ChatCompletionReply,
    CompletionReply,
    ModelCard,
    ModelList,
    documented,
)
from prefixtune.serving.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DecodingFields,
    error_body,
)
from prefixtune.serving.token_text import token_bytes, token_text

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class OpenAIError(HTTPException):
    """An HTTPException that names the offending request field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def register_openai(app: FastAPI, server: Any) -> None:
    """Add the OpenAI routes to `app` (server: app.Server)."""
    created = int(time.time())

    @app.get("/v1/models", response_model=None, responses=documented(ModelList))
    def list_models() -> dict[str, Any]:
        """The base model and every loaded prefix, as OpenAI model ids."""
        return {"object": "list", "data": _models(server, created)}

    @app.get("/v1/models/{model_id}", response_model=None, responses=documented(ModelCard))
    def get_model(model_id: str) -> dict[str, Any]:
        for entry in _models(server, created):
            if entry["id"] == model_id:
                return entry
        raise _unknown_model(model_id)

    @app.post("/v1/completions", response_model=None,
              responses=documented(CompletionReply, streams=True))  # fmt: skip
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Complete each prompt (a /v1/generate input) with the prefix named by `model`."""
        prefix = resolve_model(server, body.model)
        prompts = body.prompts()
        ids = [await _prompt_ids(server, prefix, text) for text in prompts]
        return await _answer(server, request, body, prefix, ids, "completions",
                             echo=prompts if body.echo else None)  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None,
              responses=documented(ChatCompletionReply, streams=True))  # fmt: skip
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Answer `messages` (rendered with the tokenizer's chat template) with a prefix."""
        prefix = resolve_model(server, body.model)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = await asyncio.to_thread(chat_prompt, server, prefix, messages)
        return await _answer(server, request, body, prefix, [ids], "chat")


# ---------------------------------------------------------------------------- models, prompts
def base_name(server: Any) -> str:
    return server.base_name()


def _models(server: Any, created: int) -> list[dict[str, Any]]:
    base = base_name(server)
    entries = [{"id": base, "object": "model", "created": created, "owned_by": "prefixtune",
                "root": base, "parent": None, "length": 0, "bytes": 0}]  # fmt: skip
    for item in server.bank.describe()["prefixes"]:
        entries.append({"id": item["id"], "object": "model", "created": created,
                        "owned_by": "prefixtune", "root": base, "parent": base,
                        "length": item["length"], "bytes": item["bytes"],
                        "base_model": item.get("base_model")})  # fmt: skip
    return entries


def _unknown_model(name: str) -> OpenAIError:
    return OpenAIError(404, f"the model {name!r} does not exist: GET /v1/models lists the base "
                            "model and the loaded prefixes", "model", "model_not_found")  # fmt: skip


def resolve_model(server: Any, name: str) -> str | None:
    """The prefix id `model` names (None for the base model); 404 when unknown."""
    if name in server.bank:
        return name
    if name == base_name(server):
        return None
    raise _unknown_model(name)


async def _prompt_ids(server: Any, prefix: str | None, text: str) -> list[int]:
    server.check_chars(text)
    meta = server.bank.get(prefix).meta if prefix is not None else {}
    return await asyncio.to_thread(server.prompt, text, meta)


def chat_prompt(server: Any, prefix: str | None, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by the prefix's chat template (its prefix.json
    `chat_template`) or else the tokenizer's, with the assistant's turn opened; the prefix's
    `system` default (chat training's --system) goes first where `messages` has no system (or
    developer) turn: data/chat_encoding.chat_prompt_ids, as training and evaluation prompt."""
    meta = server.bank.get(prefix).meta if prefix is not None else {}
    system = meta.get("system") if isinstance(meta.get("system"), str) else ""
    template = meta.get("chat_template")
    if not isinstance(template, str) or not template:
        try:
            template = chat_template_of(server.tokenizer, "a chat prompt")
        except DataError:
            raise OpenAIError(400, "this model's tokenizer has no chat template: use "
                                   "/v1/completions", "messages") from None  # fmt: skip
    for message in with_system(messages, system):
        server.check_chars(message["content"])
    return chat_prompt_ids(server.tokenizer, messages, template, system)


# ---------------------------------------------------------------------------- decoding options
def generate_config(server: Any, body: DecodingFields, prompts: list[list[int]],
                    prefix: str | None) -> tuple[GenerateConfig, int | None]:  # fmt: skip
    """(decoding settings, top log-probabilities per token or None), checked against the
    server's limits (400 naming the field)."""
    limits = server.config
    chat = isinstance(body, ChatCompletionRequest)
    asked = body.max_completion_tokens or body.max_tokens if chat else body.max_tokens
    field = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_new_tokens_limit:
        raise OpenAIError(400, f"{field} is {asked}; the limit is {limits.max_new_tokens_limit} "
                               "(--max-new-tokens-limit)", field)  # fmt: skip
    prefix_len = 0 if prefix is None else server.bank.get(prefix).length
    new = asked or min(COMPLETION_DEFAULT_TOKENS if not chat else limits.max_new_tokens_limit,
                       limits.max_new_tokens_limit)  # fmt: skip
    if asked is None and chat and server.context():
        room = server.context() - max(map(len, prompts)) - prefix_len
        new = max(1, min(new, room))
    for ids in prompts:
        server.check_length(ids, prefix_len, new)
    if body.num_beams > limits.max_beams:
        raise OpenAIError(400, f"num_beams is {body.num_beams}; the limit is "
                               f"{limits.max_beams} (--max-beams)", "num_beams")  # fmt: skip
    top = _logprobs(body)
    if top is not None and (body.num_beams > 1 or not server.scheduler.continuous):
        raise OpenAIError(400, "logprobs need continuous batching and num_beams 1 (beam search "
                               "and request-level batching do not report them)", "logprobs")  # fmt: skip
    sample = body.temperature > 0 and body.num_beams == 1
    config = GenerateConfig(max_new_tokens=new, num_beams=body.num_beams, do_sample=sample,
                            temperature=body.temperature if sample else 1.0, top_p=body.top_p,
                            length_penalty=body.length_penalty,
                            no_repeat_ngram_size=body.no_repeat_ngram_size)  # fmt: skip
    return config, top


def _logprobs(body: DecodingFields) -> int | None:
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _seeded(config: GenerateConfig, seed: int | None, choice: int) -> GenerateConfig:
    """Choice i samples with seed + i (a random seed when none is given)."""
    if not config.do_sample:
        return config
    base = seed if seed is not None else secrets.randbits(62)
    return dataclasses.replace(config, seed=(base + choice) % 2**63)


# ---------------------------------------------------------------------------- answering
async def _answer(server: Any, request: Request, body: DecodingFields, prefix: str | None,
                  prompts: list[list[int]], route: str, echo: list[str] | None = None) -> Any:  # fmt: skip
    """Submit every prompt x n choice as rows of one batch; reply whole or streamed."""
    arrived = time.monotonic()
    config, top = generate_config(server, body, prompts, prefix)
    metrics = server.metrics
    first = [False]

    def on_first() -> None:
        if not first[0]:
            first[0] = True
            metrics.first_token(prefix, route, arrived)

    streams: list[RowStream] = []
    try:
        for ids in prompts:
            for choice in range(body.n):
                streams.append(RowStream(server, ids, prefix, _seeded(config, body.seed, choice),
                                         stops=body.stop, logprobs=top, busy_status=429,
                                         on_first_token=on_first))  # fmt: skip
    except HTTPException:
        for stream in streams:
            stream.cancel()
        raise
    reply = Reply(server, body, route, streams, echo, n=body.n, prompts=prompts)
    done = lambda: metrics.finished(prefix, route, arrived, reply.prompt_tokens(),  # noqa: E731
                                    reply.completion_tokens(), reply.finish_reason())  # fmt: skip
    if body.stream:
        return StreamingResponse(reply.events(server, done, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    server.in_flight += 1
    try:
        choices = await watched(server, request, streams, reply.gather())
    except ClientGone:
        return JSONResponse(error_body(499, "client disconnected"), 499)
    finally:
        server.in_flight -= 1
    done()
    return reply.whole(choices)


class Reply:
    """Builds the OpenAI reply (whole, or as chunks) of one request's choices."""

    def __init__(self, server: Any, body: DecodingFields, route: str, streams: list[RowStream],
                 echo: list[str] | None, n: int, prompts: list[list[int]]) -> None:  # fmt: skip
        self.server, self.body, self.route, self.streams = server, body, route, streams
        self.echo, self.n, self.prompts = echo, n, prompts
        self.id = ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if route == "chat" else "text_completion"

    # usage --------------------------------------------------------------
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    def finish_reason(self) -> str:
        return self.streams[0].finish_reason or "stop"

    def usage(self) -> dict[str, int]:
        prompt, completion = self.prompt_tokens(), self.completion_tokens()
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}  # fmt: skip

    # whole replies --------------------------------------------------------
    async def gather(self) -> list[tuple[str, list[TokenInfo]]]:
        texts = [""] * len(self.streams)
        tokens: list[list[TokenInfo]] = [[] for _ in self.streams]
        async for index, delta in merged(self.streams):
            if delta is not None:
                texts[index] += delta.text
                tokens[index] += delta.tokens
        return list(zip(texts, tokens, strict=True))

    def whole(self, choices: list[tuple[str, list[TokenInfo]]]) -> dict[str, Any]:
        out = []
        for index, (text, tokens) in enumerate(choices):
            reason = self.streams[index].finish_reason
            if self.route == "chat":
                out.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": self._chat_logprobs(tokens),
                            "finish_reason": reason})  # fmt: skip
            else:
                head = self.echo[index // self.n] if self.echo else ""
                out.append({"index": index, "text": head + text,
                            "logprobs": self._logprobs(tokens, len(head)),
                            "finish_reason": reason})  # fmt: skip
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.body.model, "choices": out, "usage": self.usage()}  # fmt: skip

    # streamed replies ---------------------------------------------------------
    async def events(self, server: Any, done: Any, request: Any = None) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta, a last chunk per choice with its
        finish_reason, the usage when asked (stream_options), then [DONE]. A client that goes
        away cancels the rows at once, without waiting for the next chunk's write to fail."""
        server.in_flight += 1
        stopper = asyncio.ensure_future(_cancel_on_stop(server, self.streams))
        gone = None if request is None else asyncio.ensure_future(
            _cancel_on_disconnect(request, self.streams))  # fmt: skip
        try:
            if self.route == "chat":
                for index in range(len(self.streams)):
                    yield _sse(self._chunk(index, "", [], None, role=True))
            elif self.echo:
                for index in range(len(self.streams)):
                    yield _sse(self._chunk(index, self.echo[index // self.n], [], None))
            async for index, delta in merged(self.streams):
                if delta is None:
                    reason = self.streams[index].finish_reason
                    yield _sse(self._chunk(index, "", [], reason))
                elif delta.text or delta.tokens:
                    yield _sse(self._chunk(index, delta.text, delta.tokens, None))
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield _sse(self._frame([], usage=self.usage()))
            done()
        except HTTPException as err:  # the status line is sent: report it in the stream
            yield _sse(error_body(err.status_code, str(err.detail)))
        except ClientGone:
            return
        finally:
            stopper.cancel()
            if gone is not None:
                gone.cancel()
            server.in_flight -= 1
            for stream in self.streams:
                stream.cancel()
        yield "data: [DONE]\n\n"

    def _frame(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.route == "chat" else "text_completion"
        frame = {"id": self.id, "object": kind, "created": self.created,
                 "model": self.body.model, "choices": choices}  # fmt: skip
        if usage is not None:
            frame["usage"] = usage
        return frame

    def _chunk(self, index: int, text: str, tokens: list[TokenInfo], reason: str | None,
               role: bool = False) -> dict[str, Any]:  # fmt: skip
        if self.route == "chat":
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            if reason is not None:
                delta = {}
            choice = {"index": index, "delta": delta, "finish_reason": reason,
                      "logprobs": self._chat_logprobs(tokens) if tokens else None}  # fmt: skip
        else:
            choice = {"index": index, "text": text, "finish_reason": reason,
                      "logprobs": self._logprobs(tokens, 0) if tokens else None}  # fmt: skip
        return self._frame([choice])

    # log-probabilities --------------------------------------------------------
    def _text(self, token: int) -> str:
        return token_text(self.server.tokenizer, token)

    def _logprobs(self, tokens: list[TokenInfo], shift: int) -> dict[str, Any] | None:
        """/v1/completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        if self.body.logprobs is None:
            return None
        return {"tokens": [self._text(t.token) for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{self._text(i): lp for i, lp in t.top} for t in tokens],
                "text_offset": [t.offset + shift for t in tokens]}  # fmt: skip

    def _chat_logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if not getattr(self.body, "logprobs", False):
            return None
        return {"content": [{**self._entry(t.token, t.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}  # fmt: skip

    def _entry(self, token: int, logprob: float | None) -> dict[str, Any]:
        raw = token_bytes(self.server.tokenizer, token)
        return {"token": self._text(token), "logprob": logprob, "bytes": list(raw)}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Any, streams: list[RowStream]) -> None:
    """A streamed reply's client went away: its rows leave the batch at the next step."""
    await disconnected(request)
    for stream in streams:
        stream.cancel()


async def _cancel_on_stop(server: Any, streams: list[RowStream]) -> None:
    """A drain that times out cancels streamed rows too (their readers then report a 503)."""
    if server.stopping is None:
        return
    await server.stopping.wait()
    for stream in streams:
        stream.cancel()


def unknown_prefix_error(err: UnknownPrefixError) -> OpenAIError:
    return _unknown_model(str(err))
