"""`prefixtune serve`: many prefixes, one frozen model, mixed batches over HTTP.

    prefixtune serve --model smollm2 --prefixes runs/ --port 8000

Endpoints (OpenAPI docs at /docs): POST /v1/generate, GET /v1/prefixes, GET /health,
POST /v1/admin/prefixes (hot-load), DELETE /v1/admin/prefixes/{id} (admin: only with
--admin-token). Every reply to a bad request is a 4xx with a short JSON-safe `detail`; bodies are
checked (JSON, size) before parsing; SIGTERM/SIGINT drain first. See docs/SERVING.md.
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixtune.config import ConfigError
from prefixtune.core.artifact import (
    PREFIX_JSON,
    PREFIX_TENSORS,
    RUN_ARTIFACT,
    ArtifactError,
    trained_separator,
)
from prefixtune.core.models import is_encoder_decoder, public_model_id
from prefixtune.data.encoding import encode_prompt
from prefixtune.serving.bank import PrefixBank, UnknownPrefixError
from prefixtune.serving.decoding import ClientGone, RowStream, collect, watched
from prefixtune.serving.edge import EdgeGuard, bearer_matches, excerpt, safe_error
from prefixtune.serving.metrics import Metrics, register_metrics
from prefixtune.serving.openai_api import register_openai
from prefixtune.serving.openai_schemas import error_body, is_openai_path
from prefixtune.serving.playground import register_playground
from prefixtune.serving.scheduler import Scheduler
from prefixtune.serving.schemas import GenerateResponse, LoadPrefixRequest, request_model

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
    """Address to listen on (loopback by default; another address needs --api-key,
    --admin-token or --allow-public)."""
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
    quantize: str = "none"
    """Frozen base weights: none, int8 (torchao weight-only linear layers) or int4 (where
    torchao has a kernel for the device); prefixes trained on either base load unchanged."""
    admin_token: str = ""
    """Enables the admin endpoints (hot-load, unload), which then need the header
    'Authorization: Bearer TOKEN'; without it they answer 403."""
    api_key: str = ""
    """Clients must send 'Authorization: Bearer KEY' on every /v1/ endpoint but the admin ones
    (401 otherwise); default: the PREFIXTUNE_API_KEY environment variable, else no key."""
    allow_any_prefix_path: bool = False
    """Let hot-loading read directories outside --prefixes (by default a path must resolve
    inside it: no '..', no symbolic links out)."""
    allow_public: bool = False
    """Listen on a non-loopback --host without --admin-token (anyone who can reach the port may
    generate)."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes, checked before parsing; larger bodies get 413."""
    drain_timeout: float = 30.0
    """Seconds SIGTERM/SIGINT waits for in-flight requests (new ones get 503) before answering
    the rest 503 and exiting."""

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_size", "max_queue", "max_input_tokens",
                     "max_new_tokens_limit", "max_beams", "max_body_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_wait_ms < 0:
            raise ConfigError("--max-wait-ms must be >= 0")
        if not self.drain_timeout >= 0:
            raise ConfigError("--drain-timeout must be >= 0 seconds")
        self.api_key = self.api_key or os.environ.get("PREFIXTUNE_API_KEY", "")
        public = not (self.api_key or self.admin_token or self.allow_public)
        if not is_loopback(self.host) and public:
            raise ConfigError(f"--host {self.host!r} is not a loopback address: set --api-key "
                              "(or --admin-token), or pass --allow-public to let anyone who can "
                              "reach the port generate without one")  # fmt: skip
        if self.max_new_tokens_limit > 100_000:
            raise ConfigError("--max-new-tokens-limit must be <= 100000")


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = [safe_error(e) for e in err.errors()]
    if is_openai_path(request.url.path):  # OpenAI answers bad fields 400, naming the field
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        message = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}"
                            for e in errors)  # fmt: skip
        return JSONResponse(error_body(400, message, param, first.get("type")), 400)
    return JSONResponse({"detail": errors}, 422)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    detail = err.detail if isinstance(err.detail, str) else str(err.detail)
    detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
    if is_openai_path(request.url.path):
        body = error_body(err.status_code, detail, getattr(err, "param", None),
                          getattr(err, "code", None))  # fmt: skip
        return JSONResponse(body, err.status_code, headers=err.headers)
    return JSONResponse({"detail": detail}, err.status_code, headers=err.headers)


# ---------------------------------------------------------------------------- the app
@dataclass
class Server:
    """What the endpoints share: model, tokenizer, bank, scheduler and limits."""

    model: Any
    tokenizer: Any
    bank: PrefixBank
    scheduler: Scheduler
    config: ServeConfig
    draining: bool = False  # new requests get 503; set by a drain or the lifespan's end
    in_flight: int = 0  # generate requests being answered
    stopping: asyncio.Event | None = None  # set when a drain times out: answer the rest 503
    metrics: Metrics | None = None  # GET /metrics; set by create_app

    def base_name(self) -> str:
        """The base model's name in replies and as an OpenAI model id (never a path)."""
        return public_model_id(self.model)

    def prompt(self, text: str, prefix_meta: dict[str, Any]) -> list[int]:
        """Prompt ids in the format the prefix (its prefix.json `meta`) was trained with."""
        return encode_prompt(text, self.tokenizer, encoder_decoder=is_encoder_decoder(self.model),
                             separator=trained_separator(prefix_meta))  # fmt: skip

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

    def hot_load_path(self, prefix_id: str, path: str | None) -> Path:
        """The directory a hot-load reads: PREFIXES/id by default, a relative `path` under
        --prefixes. Unless --allow-any-prefix-path, it and its artifact files must resolve
        inside --prefixes (403 otherwise, without echoing the path)."""
        root = Path(self.config.prefixes) if self.config.prefixes else None
        if path is None and root is None:
            raise HTTPException(422, "give 'path' (the server has no --prefixes directory)")
        given = Path(path) if path is not None else Path(prefix_id)
        candidate = given if root is None or given.is_absolute() else root / given
        if self.config.allow_any_prefix_path:
            return candidate
        outside = HTTPException(403, f"the path for prefix {prefix_id!r} resolves outside the "
                                     "--prefixes directory; restart with --allow-any-prefix-path "
                                     "to load from anywhere")  # fmt: skip
        if root is None:
            raise outside
        inside = root.resolve()
        files = [candidate / name for name in (PREFIX_JSON, PREFIX_TENSORS)]
        files += [candidate / RUN_ARTIFACT / f.name for f in files]
        try:
            if not all(p.resolve().is_relative_to(inside) for p in [candidate, *files]):
                raise outside
        except (OSError, RuntimeError):  # a symbolic link loop
            raise HTTPException(422, f"prefix {prefix_id!r}: the path cannot be resolved") from None
        return candidate


def _unknown(prefix_id: str) -> HTTPException:
    return HTTPException(404, f"unknown prefix {excerpt(repr(prefix_id))}; GET /v1/prefixes "
                              "lists the loaded prefixes (use null for the base model)")  # fmt: skip


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over a Server; the lifespan starts and drains its scheduler."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.draining, server.in_flight, server.stopping = False, 0, asyncio.Event()
        server.scheduler.start()
        yield
        server.draining = True
        server.stopping.set()  # a shutdown without a drain: answer what is left 503
        closing = server.config.drain_timeout + 10.0
        if not await asyncio.to_thread(server.scheduler.close, closing):
            log.error("the scheduler did not stop within %.0f s", closing)

    app = FastAPI(title="prefixtune", version="1", lifespan=lifespan,
                  description="Prefix-tuned generation: many prefixes, one frozen model.")  # fmt: skip
    app.state.server = server
    server.metrics = Metrics(server, server.base_name())
    app.add_middleware(EdgeGuard, server=server)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    GenerateRequest = request_model(server.config.max_new_tokens_limit, server.config.max_beams)

    def admin(authorization: str | None = Header(None)) -> None:
        token = server.config.admin_token
        if not token:
            raise HTTPException(403, "admin endpoints are off: start the server with "
                                     "--admin-token TOKEN to enable them")  # fmt: skip
        if not bearer_matches(authorization, token):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <token>'",
                                {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate_text(body: GenerateRequest, request: Request) -> Any:  # type: ignore[valid-type]
        """Generate a continuation of `input` with the named prefix (or none)."""
        server.in_flight += 1
        try:
            return await _generate(server, body, request)
        finally:
            server.in_flight -= 1

    @app.get("/v1/prefixes")
    def list_prefixes() -> dict[str, Any]:
        """Loaded prefixes with their memory (bytes) and any artifacts that failed to load."""
        return {"base_model": public_model_id(server.model), **server.bank.describe()}

    @app.get("/health")
    def health() -> JSONResponse:
        """Status "ok" (200), or "draining" (503 with Retry-After) while shutting down."""
        body = {"status": "draining" if server.draining else "ok", "prefixes": len(server.bank),
                "scheduler": server.scheduler.stats()}  # fmt: skip
        if server.draining:
            return JSONResponse(body, 503, {"Retry-After": "1"})
        return JSONResponse(body)

    @app.post("/v1/admin/prefixes", status_code=201, dependencies=[Depends(admin)])
    def load_prefix(body: LoadPrefixRequest) -> dict[str, Any]:
        """Hot-load a prefix (or run) directory under a new id; checked against the model."""
        path = server.hot_load_path(body.id, body.path)
        try:
            entry = server.bank.load(body.id, path, replace=body.replace)
        except FileExistsError as err:
            raise HTTPException(409, str(err)) from None
        except (ArtifactError, OSError, ValueError) as err:
            detail = server.bank.public_error(err)
            raise HTTPException(422, f"prefix {body.id!r} not loaded: {detail}") from None
        return entry.describe(server.bank.root)

    @app.delete("/v1/admin/prefixes/{prefix_id}", status_code=204, dependencies=[Depends(admin)])
    def unload_prefix(prefix_id: str) -> None:
        """Unload a prefix; requests already running keep it until they finish."""
        try:
            server.bank.remove(prefix_id)
        except UnknownPrefixError:
            raise _unknown(prefix_id) from None

    register_openai(app, server)
    register_metrics(app, server)
    register_playground(app, server)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")  # the message may name files: only the log has it
        message = f"internal error ({type(err).__name__}); see the server log"
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(500, message), 500)
        return JSONResponse({"detail": message}, 500)

    return app


async def _generate(server: Server, body: Any, request: Request) -> Any:
    """POST /v1/generate: tokenise off the event loop, then the shared decoding path
    (decoding.RowStream: queue, read as it decodes, cancel when the client goes)."""
    try:
        entry = None if body.prefix is None else server.bank.get(body.prefix)
    except UnknownPrefixError:
        raise _unknown(body.prefix) from None
    prefix_len = 0 if entry is None else entry.length
    server.check_chars(body.input)
    prompt = await asyncio.to_thread(server.prompt, body.input, entry.meta if entry else {})
    server.check_length(prompt, prefix_len, body.max_new_tokens)
    arrived = time.monotonic()
    stream = RowStream(server, prompt, body.prefix, body.generate_config(),
                       on_first_token=lambda: server.metrics.first_token(
                           body.prefix, "generate", arrived))  # fmt: skip
    try:
        await watched(server, request, [stream], collect(stream))
    except ClientGone:  # the client has gone: nobody reads this reply
        log.info("client disconnected; its request was cancelled")
        return JSONResponse({"detail": "client disconnected"}, 499)
    tokens = stream.detok.tokens
    server.metrics.finished(body.prefix, "generate", arrived, len(prompt), len(tokens),
                            stream.finish_reason)  # fmt: skip
    return GenerateResponse(
        text=server.text(tokens), prompt_tokens=len(prompt), completion_tokens=len(tokens),
        prefix=body.prefix, finish_reason=stream.finish_reason,
        latency_ms=(time.monotonic() - arrived) * 1000.0,
    )  # fmt: skip


def build_server(config: ServeConfig, model: Any = None, tokenizer: Any = None) -> Server:
    """Load the model (unless given) and the prefixes; the scheduler is created, not started."""
    from prefixtune.core.models import load_model
    from prefixtune.core.runtime import resolve_device

    if model is None:
        device = str(resolve_device(config.device))
        model, tokenizer = load_model(config.model or None, dtype=config.dtype, device=device)
    if config.quantize != "none":
        from prefixtune.core.quantize import quantize_model

        quantize_model(model, config.quantize)
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
