"""`prefixtune serve`: many prefixes, one frozen model, mixed batches over HTTP.

    prefixtune serve --model smollm2 --prefixes runs/ --port 8000

Endpoints (OpenAPI docs at /docs): POST /v1/generate, GET /v1/prefixes, GET /health,
POST /v1/admin/prefixes (hot-load), DELETE /v1/admin/prefixes/{id}. See docs/SERVING.md.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from prefixtune.config import ConfigError, GenerateConfig
from prefixtune.core.artifact import ArtifactError, trained_separator
from prefixtune.core.models import is_encoder_decoder
from prefixtune.data.encoding import prompt_ids
from prefixtune.serving.bank import PrefixBank, UnknownPrefixError
from prefixtune.serving.scheduler import QueueFull, Scheduler, SchedulerClosed

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 64  # inputs longer than this many characters per allowed token are refused


@dataclass
class ServeConfig:
    """How `prefixtune serve` runs."""

    model: str = ""
    """Base model: a hub id or local directory; empty for the embedded default (SmolLM2-135M)."""
    prefixes: str = ""
    """Directory of prefixes: each subdirectory a prefix or run directory (id = its name)."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; the API has no user authentication)."""
    port: int = 8000
    """TCP port."""
    max_batch_size: int = 16
    """Most rows decoding together."""
    max_wait_ms: float = 10.0
    """How long an idle server waits for more requests before it starts a batch."""
    max_queue: int = 1024
    """Most requests waiting; more get 503."""
    max_input_tokens: int = 512
    """Longest accepted input in tokens; longer inputs get 413."""
    max_new_tokens_limit: int = 512
    """Largest max_new_tokens a request may ask for."""
    max_beams: int = 8
    """Largest num_beams a request may ask for."""
    continuous: bool = True
    """Continuous batching where the model allows it (else request-level batching)."""
    compile: bool = False
    """Decode under torch.compile (as `generate --compile`): faster steps, but the first
    requests of each kind (prefill, step, lone row) wait minutes for the compile."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    dtype: str = "float32"
    """Model weights dtype: float32, bfloat16 or float16."""
    admin_token: str = ""
    """When set, the admin endpoints need the header 'Authorization: Bearer TOKEN'."""

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_size", "max_queue", "max_input_tokens",
                     "max_new_tokens_limit", "max_beams"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_wait_ms < 0:
            raise ConfigError("--max-wait-ms must be >= 0")
        if self.max_new_tokens_limit > 100_000:
            raise ConfigError("--max-new-tokens-limit must be <= 100000")


# ---------------------------------------------------------------------------- API schemas
class GenerateRequestBase(BaseModel):
    """A generation request (max_new_tokens and num_beams bounds are the server's)."""

    model_config = ConfigDict(extra="forbid")
    prefix: str | None = Field(None, description="prefix id (GET /v1/prefixes); null: none")
    input: str = Field(..., min_length=1, description="source text, e.g. a linearised table")
    do_sample: bool = Field(False, description="sample instead of greedy/beam search")
    temperature: float = Field(1.0, gt=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="sampling seed (per request)")
    length_penalty: float = Field(1.0, ge=-10, le=10)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    early_stopping: bool = True

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
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., description="the new prefix id")
    path: str | None = Field(None, description="prefix or run directory (default: PREFIXES/id)")
    replace: bool = Field(False, description="replace a loaded prefix with the same id")


# ---------------------------------------------------------------------------- the app
@dataclass
class Server:
    """What the endpoints share: model, tokenizer, bank, scheduler and limits."""

    model: Any
    tokenizer: Any
    bank: PrefixBank
    scheduler: Scheduler
    config: ServeConfig
    draining: bool = False

    def prompt(self, text: str, prefix_meta: dict[str, Any]) -> list[int]:
        """Prompt ids in the format the prefix (its prefix.json `meta`) was trained with."""
        if is_encoder_decoder(self.model):
            return self.tokenizer(text)["input_ids"]
        return prompt_ids(text, self.tokenizer, separator=trained_separator(prefix_meta))

    def context(self) -> int | None:
        text = self.model.config.get_text_config()
        return getattr(text, "max_position_embeddings", None)

    def check_chars(self, text: str) -> None:
        """413 before tokenizing an input far longer than any accepted one."""
        limit = self.config.max_input_tokens
        if len(text) > CHARS_PER_TOKEN * limit:
            raise HTTPException(413, f"input is {len(text)} characters; the limit is {limit} "
                                     "tokens (--max-input-tokens)")  # fmt: skip

    def check_length(self, prompt: list[int], prefix_len: int, new: int) -> None:
        """413 when the input (or input + prefix + new tokens) exceeds the limits."""
        limit = self.config.max_input_tokens
        if len(prompt) > limit:
            raise HTTPException(413, f"input is {len(prompt)} tokens; the limit is {limit} "
                                     "tokens (--max-input-tokens)")  # fmt: skip
        context = self.context()
        if context and not is_encoder_decoder(self.model):
            total = len(prompt) + prefix_len + new
            if total > context:
                raise HTTPException(413, f"input ({len(prompt)} tokens) + prefix ({prefix_len}) "
                                         f"+ max_new_tokens ({new}) = {total} exceeds the "
                                         f"model's {context} positions")  # fmt: skip

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _unknown(prefix_id: str) -> HTTPException:
    return HTTPException(404, f"unknown prefix {prefix_id!r}; GET /v1/prefixes lists the loaded "
                              "prefixes (use null for the base model)")  # fmt: skip


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over a Server; the lifespan starts and drains its scheduler."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.draining = False
        server.scheduler.start()
        yield
        server.draining = True
        await asyncio.to_thread(server.scheduler.close)

    app = FastAPI(title="prefixtune", version="1", lifespan=lifespan,
                  description="Prefix-tuned generation: many prefixes, one frozen model.")  # fmt: skip
    app.state.server = server
    GenerateRequest = request_model(server.config.max_new_tokens_limit, server.config.max_beams)

    def admin(authorization: str | None = Header(None)) -> None:
        token = server.config.admin_token
        if token and not secrets.compare_digest(authorization or "", f"Bearer {token}"):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <token>'")

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate_text(body: GenerateRequest) -> GenerateResponse:  # type: ignore[valid-type]
        """Generate a continuation of `input` with the named prefix (or none)."""
        try:
            entry = None if body.prefix is None else server.bank.get(body.prefix)
        except UnknownPrefixError:
            raise _unknown(body.prefix) from None
        prefix_len = 0 if entry is None else entry.length
        server.check_chars(body.input)
        prompt = server.prompt(body.input, entry.meta if entry else {})
        server.check_length(prompt, prefix_len, body.max_new_tokens)
        try:
            future = server.scheduler.submit(prompt, body.prefix, body.generate_config())
        except QueueFull as err:
            raise HTTPException(503, f"server busy: {err}", {"Retry-After": "1"}) from None
        except SchedulerClosed as err:
            raise HTTPException(503, str(err)) from None
        try:
            result = await asyncio.wrap_future(future)
        except UnknownPrefixError:
            raise _unknown(body.prefix) from None
        return GenerateResponse(
            text=server.text(result.tokens), prompt_tokens=len(prompt),
            completion_tokens=len(result.tokens), prefix=body.prefix,
            finish_reason=result.finish_reason, latency_ms=result.total_s * 1000.0,
        )  # fmt: skip

    @app.get("/v1/prefixes")
    def list_prefixes() -> dict[str, Any]:
        """Loaded prefixes with their memory (bytes) and any artifacts that failed to load."""
        return {"base_model": _model_name(server.model), **server.bank.describe()}

    @app.get("/health")
    def health() -> dict[str, Any]:
        status = "draining" if server.draining else "ok"
        return {"status": status, "prefixes": len(server.bank),
                "scheduler": server.scheduler.stats()}  # fmt: skip

    @app.post("/v1/admin/prefixes", status_code=201, dependencies=[Depends(admin)])
    def load_prefix(body: LoadPrefixRequest) -> dict[str, Any]:
        """Hot-load a prefix (or run) directory under a new id; checked against the model."""
        path = body.path
        if path is None:
            if not server.config.prefixes:
                raise HTTPException(422, "give 'path' (the server has no --prefixes directory)")
            path = str(Path(server.config.prefixes) / body.id)
        try:
            entry = server.bank.load(body.id, path, replace=body.replace)
        except FileExistsError as err:
            raise HTTPException(409, str(err)) from None
        except (ArtifactError, OSError) as err:
            raise HTTPException(422, f"prefix {body.id!r} not loaded: {err}") from None
        return entry.describe()

    @app.delete("/v1/admin/prefixes/{prefix_id}", status_code=204, dependencies=[Depends(admin)])
    def unload_prefix(prefix_id: str) -> None:
        """Unload a prefix; requests already running keep it until they finish."""
        try:
            server.bank.remove(prefix_id)
        except UnknownPrefixError:
            raise _unknown(prefix_id) from None

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, 500)

    return app


def _model_name(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def build_server(config: ServeConfig, model: Any = None, tokenizer: Any = None) -> Server:
    """Load the model (unless given) and the prefixes; the scheduler is created, not started."""
    import torch

    from prefixtune.core.models import load_model

    if model is None:
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(config.model or None, dtype=config.dtype, device=device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bank = PrefixBank(model)
    if config.prefixes:
        bank.load_dir(config.prefixes)
    scheduler = Scheduler(
        model, bank, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue, continuous=None if config.continuous else False,
        compile=config.compile,
    )  # fmt: skip
    return Server(model, tokenizer, bank, scheduler, config)


# ---------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixtune.cli.args import add_dataclass_arguments

    add_dataclass_arguments(parser, ServeConfig)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from prefixtune.cli.args import dataclass_from_args

    config = dataclass_from_args(ServeConfig, args)
    if config.prefixes and not Path(config.prefixes).is_dir():
        raise ConfigError(f"--prefixes {config.prefixes}: not a directory")
    if not _is_loopback(config.host):
        log.warning("listening on %s: anyone who can reach it may generate%s", config.host,
                    "" if config.admin_token else " and load prefixes (set --admin-token)")  # fmt: skip
    server = build_server(config)  # artifacts that do not fit are logged and skipped
    log.info("serving %d prefixes (%s batching) on http://%s:%d", len(server.bank),
             server.scheduler.stats()["mode"], config.host, config.port)  # fmt: skip
    uvicorn.run(create_app(server), host=config.host, port=config.port, log_level="info")
    return 0
