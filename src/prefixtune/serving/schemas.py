"""The request and reply schemas of the HTTP API (strict types, bounds stated in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from prefixtune.config import GenerateConfig

MIN_TEMPERATURE, MIN_TOP_P = 1e-2, 1e-3  # below these, sampling is greedy or degenerate


# ---------------------------------------------------------------------------- API schemas
class GenerateRequestBase(BaseModel):
    """A generation request (max_new_tokens and num_beams bounds are the server's)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "4", true, "yes" are not numbers
    prefix: str | None = Field(None, max_length=128,
                               description="prefix id (GET /v1/prefixes); null: none")  # fmt: skip
    input: str = Field(..., min_length=1, description="source text, e.g. a linearised table")
    do_sample: bool = Field(False, description="sample instead of greedy/beam search")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=100, allow_inf_nan=False,
                               description="sampling temperature; for greedy use do_sample=false")  # fmt: skip
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="sampling seed (per request)")
    length_penalty: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    early_stopping: bool = True

    @field_validator("input", "prefix")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return unicode_text(value)

    @model_validator(mode="after")
    def _compatible(self):
        if not self.input.strip():
            raise ValueError("input is blank")
        if self.do_sample and getattr(self, "num_beams", 1) > 1:
            raise ValueError("do_sample with num_beams > 1 is not supported; set num_beams=1")
        return self

    def generate_config(self) -> GenerateConfig:
        fields = self.model_dump(exclude={"prefix", "input"})
        return GenerateConfig(**fields)


def request_model(max_new_tokens: int, max_beams: int) -> type[GenerateRequestBase]:
    """The request schema with this server's bounds (so 422s and /docs state them)."""
    default = min(64, max_new_tokens)
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequestBase,
        max_new_tokens=(int, Field(default, ge=1, le=max_new_tokens)),
        num_beams=(int, Field(1, ge=1, le=max_beams)),
    )


class GenerateResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    prefix: str | None
    finish_reason: str = Field(description="'stop' (end of sequence) or 'length'")
    latency_ms: float


class LoadPrefixRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(..., max_length=128, description="the new prefix id")
    path: str | None = Field(None, max_length=4096, description="prefix or run directory, "
                             "relative to --prefixes (default: PREFIXES/id)")  # fmt: skip
    replace: bool = Field(False, description="replace a loaded prefix with the same id")

    @field_validator("id", "path")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return unicode_text(value)


def unicode_text(value: str | None) -> str | None:
    """Refuse lone surrogates (unpaired \\ud800-\\udfff escapes): no tokenizer, path or reply
    can encode them."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape); "
                             "send valid Unicode text") from None  # fmt: skip
    return value
