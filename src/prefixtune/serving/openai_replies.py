"""The OpenAI-compatible API's reply schemas, for the OpenAPI document (GET /openapi.json).

The routes build their replies as plain dicts (openai_api.Reply); these models only describe
them (every field they always send is required), so `app.openapi()` documents what the `openai` client parses (tests/serving/
test_openai_openapi.py checks them against the client's own types). `finish_reason` is "stop"
(end of text or a stop string) or "length" (max_tokens).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class ModelCard(BaseModel):
    """GET /v1/models/{id}: the base model or one loaded prefix."""

    id: str = Field(..., description="the prefix id, or the base model's name")
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(..., description="the base model")
    parent: str | None = Field(..., description="the base model (null for the base itself)")
    length: int = Field(..., description="prefix length in virtual tokens (0 for the base)")
    bytes: int = Field(..., description="size of the prefix's keys/values")
    base_model: str | None = Field(None, description="the base model the prefix was trained on")


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = Field(..., description="with `logprobs`")
    finish_reason: FinishReason


class CompletionReply(BaseModel):
    """POST /v1/completions without `stream` (streamed: one such object per event, with
    `text` the new piece and `finish_reason` null until the choice's last event)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(..., description="the token's UTF-8 bytes")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = Field(..., description="with `logprobs: true`")
    finish_reason: FinishReason


class ChatCompletionReply(BaseModel):
    """POST /v1/chat/completions without `stream` (streamed: `chat.completion.chunk` events)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


SSE = {"text/event-stream": {"schema": {"type": "string", "description": "with stream: "
                                        "true, `data: {chunk}` events, then `data: [DONE]`"}}}  # fmt: skip


def documented(model: type[BaseModel], streams: bool = False) -> dict[int | str, Any]:
    """A route's `responses=` entry: its 200 reply is `model` (and server-sent events when it
    streams)."""
    entry: dict[str, Any] = {"model": model, "description": model.__doc__.splitlines()[0]}
    if streams:
        entry["content"] = SSE
    return {200: entry}
