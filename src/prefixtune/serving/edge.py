"""The edge of the HTTP server: body limits and content types before parsing, error replies that
quote only a short, JSON-safe excerpt, and the admin token check."""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from prefixtune.serving.openai_schemas import error_body, is_openai_path

if TYPE_CHECKING:  # a type only: the app imports this module
    from prefixtune.serving.app import Server


EXCERPT_CHARS = 80  # error replies quote at most this much of an offending value


BODY_METHODS = ("POST", "PUT", "PATCH")


# ---------------------------------------------------------------------------- safe replies
def excerpt(value: Any) -> Any:
    """A short, JSON-safe stand-in for a value quoted in an error reply (never the whole
    value, never NaN or a lone surrogate)."""
    if value is None or isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**63):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= EXCERPT_CHARS:
        return text
    return f"{text[:EXCERPT_CHARS]}... ({len(text)} characters)"


def safe_error(error: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error with its input and context cut to excerpts."""
    safe = {"type": error.get("type"), "loc": [excerpt(part) for part in error.get("loc", ())],
            "msg": excerpt(str(error.get("msg", "")))}  # fmt: skip
    if "input" in error:
        safe["input"] = excerpt(error["input"])
    if error.get("ctx"):
        safe["ctx"] = {str(k): excerpt(v if isinstance(v, int | float | str) else str(v))
                       for k, v in error["ctx"].items()}  # fmt: skip
    return safe


def bearer_matches(authorization: str | None, token: str) -> bool:
    """'Bearer TOKEN' with the scheme in any case; the header's raw bytes are compared."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    given = credentials.strip().encode("latin-1", "replace")  # ASGI headers decode as latin-1
    return secrets.compare_digest(given, token.encode("utf-8")) and scheme.lower() == "bearer"


# ---------------------------------------------------------------------------- the edge
class EdgeGuard:
    """ASGI middleware that answers before FastAPI parses anything: while draining, 503 with
    Retry-After for every path but /health; request bodies must be JSON (415) and at most
    --max-body-bytes (413), from Content-Length and by counting streamed (chunked) bytes."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is None and scope["method"] in BODY_METHODS:
            limit = self.server.config.max_body_bytes
            body = await read_body(receive, limit)
            if body is None:  # the client went away
                return None
            if len(body) > limit:
                refusal = (413, f"request body over {limit} bytes (--max-body-bytes)", None)
            else:
                receive = _replay(body, receive)
        if refusal is not None:
            status, detail, headers = refusal
            body = {"detail": detail}
            if is_openai_path(scope["path"]):
                body = error_body(status, detail, code="invalid_api_key" if status == 401 else None)
            return await JSONResponse(body, status, headers)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> tuple[int, str, dict | None] | None:
        """(status, detail, headers) to answer from the request line and headers, or None."""
        if self.server.draining and scope["path"] != "/health":
            return 503, "the server is shutting down; retry", {"Retry-After": "1"}
        if self._needs_key(scope):
            return 401, ("send the API key as 'Authorization: Bearer KEY' (the server runs with "
                         "--api-key)"), {"WWW-Authenticate": "Bearer"}  # fmt: skip
        if scope["method"] not in BODY_METHODS:
            return None
        headers = Headers(scope=scope)
        kind = headers.get("content-type")
        main = (kind or "").split(";")[0].strip().lower()
        json_type = main == "application/json" or (main.startswith("application/")
                                                   and main.endswith("+json"))  # fmt: skip
        if kind is not None and not json_type:
            return 415, (f"send the body as JSON with 'Content-Type: application/json' (got "
                         f"{excerpt(kind)!r})"), None  # fmt: skip
        length, limit = headers.get("content-length"), self.server.config.max_body_bytes
        if length is not None and not length.strip().isdigit():
            return 400, "invalid Content-Length header", None
        if length is not None and int(length) > limit:
            detail = f"request body is {int(length)} bytes; the limit is {limit} bytes"
            return 413, f"{detail} (--max-body-bytes)", None
        return None

    def _needs_key(self, scope: dict) -> bool:
        """True when --api-key is set and this /v1/ request (admin ones aside) lacks it."""
        key, path = self.server.config.api_key, scope["path"]
        if not key or not path.startswith("/v1/") or path.startswith("/v1/admin/"):
            return False
        return not bearer_matches(Headers(scope=scope).get("authorization"), key)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that hands the app the buffered body, then the connection's own messages
    (so a later disconnect is still seen)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return replay


async def read_body(receive: Any, limit: int) -> bytes | None:
    """The whole body, or its first limit+1 bytes when longer; None if the client left."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or not message.get("more_body", False):
            return b"".join(chunks)
