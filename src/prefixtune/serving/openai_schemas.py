"""The OpenAI-compatible API's request schemas and its error body (docs/SERVING.md).

Requests are strict (`"4"` is not an integer) and refuse unknown fields; fields OpenAI defines
that this server cannot honour (penalties, logit bias) are accepted only at their neutral value.
`num_beams`, `length_penalty` and `no_repeat_ngram_size` are extensions (the paper decodes with
beams), as vLLM's `use_beam_search` is.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefixtune.serving.schemas import unicode_text

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}  # fmt: skip


def is_openai_path(path: str) -> bool:
    """True for the routes whose errors use OpenAI's schema."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error schema: {"error": {"message", "type", "param", "code"}}."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class DecodingFields(_Strict):
    """What completions and chat completions share."""

    model: str = Field(..., min_length=1, max_length=256,
                       description="a prefix id, or the base model's name (GET /v1/models)")  # fmt: skip
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16)")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False,
                               description="0 decodes greedily; above 0 samples")  # fmt: skip
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends "
                                         "before the first one (not included)")  # fmt: skip
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed (choice i "
                             "uses seed + i)")  # fmt: skip
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    num_beams: int = Field(1, ge=1, description="extension: beam search (greedy beams)")
    length_penalty: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False,
                                  description="extension: beam length normalisation")  # fmt: skip
    no_repeat_ngram_size: int = Field(0, ge=0, le=64, description="extension")

    @field_validator("model", "user")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return unicode_text(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        for s in stops:
            unicode_text(s)
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name} is not supported; send 0 or leave it out")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it out")
        if self.num_beams > 1 and "temperature" in self.model_fields_set and self.temperature:
            raise ValueError("num_beams > 1 is beam search: send temperature 0 or leave it out")
        return self


class CompletionRequest(DecodingFields):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(..., description="an input, or a list of inputs (each a row "
                                    "of the same batch), as /v1/generate's input")  # fmt: skip
    echo: bool = Field(False, description="start each choice's text with its prompt")
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probabilities per "
                                 "token (raw model distribution)")  # fmt: skip
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            unicode_text(text)
            if not text.strip():
                raise ValueError("a prompt is blank")
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError("give 1 to 64 prompts")
        return value

    @model_validator(mode="after")
    def _combination(self):
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n (or be left out)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (prompt log-probabilities) is not supported")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | list[TextPart]) -> str:
        text = value if isinstance(value, str) else "".join(p.text for p in value)
        return unicode_text(text)


class ChatCompletionRequest(DecodingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _combination(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self
