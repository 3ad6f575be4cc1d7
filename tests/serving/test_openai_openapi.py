"""The OpenAPI document of the OpenAI routes against the shapes the `openai` client parses: for
GET /v1/models, POST /v1/completions and POST /v1/chat/completions, every field the client's own
pydantic type requires (openai.types.Model / SyncPage, Completion, chat.ChatCompletion) is
required in our documented 200 reply with a compatible JSON type; and real replies of the live
server validate both with the client's types and with our documented models."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
import test_openai_api
from openai.pagination import SyncPage
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion

from prefixtune.serving.app import create_app
from prefixtune.serving.openai_replies import (
    ChatCompletionReply,
    CompletionReply,
    ModelCard,
    ModelList,
)

from test_serve import SOURCES

served, live = test_openai_api.served, test_openai_api.live

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTES = [("/v1/models", "get", SyncPage[Model]), ("/v1/models/{model_id}", "get", Model),
          ("/v1/completions", "post", Completion),
          ("/v1/chat/completions", "post", ChatCompletion)]  # fmt: skip


# ---------------------------------------------------------------------------- the checker
def _resolve(schema: dict, doc: dict) -> dict:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _alternatives(schema: dict, doc: dict) -> list[dict]:
    schema = _resolve(schema, doc)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return [alt for option in options for alt in _alternatives(option, doc)]
    return [schema]


def _kind(schema: dict) -> str | None:
    if "const" in schema:
        return {str: "string", int: "integer", bool: "boolean"}[type(schema["const"])]
    return schema.get("type")


def _values(schema: dict) -> set | None:
    if "const" in schema:
        return {schema["const"]}
    return set(schema["enum"]) if "enum" in schema else None


def _one(ours: dict, theirs: dict, docs: tuple[dict, dict], path: str) -> list[str]:
    """Why a value of `ours` (one alternative) may not parse as `theirs` (one alternative)."""
    if not theirs or theirs.get("type") is None and "const" not in theirs and "enum" not in theirs:
        return []  # the client accepts anything here
    kind, want = _kind(ours), _kind(theirs)
    if kind != want and not (kind == "integer" and want == "number"):
        return [f"{path}: ours is {kind}, the client's is {want}"]
    allowed, sent = _values(theirs), _values(ours)
    if allowed is not None and (sent is None or not sent <= allowed):
        return [f"{path}: ours may be {sorted(sent) if sent else 'any ' + kind}, the client "
                f"accepts {sorted(allowed)}"]  # fmt: skip
    if kind == "array":
        return compatible(ours.get("items", {}), theirs.get("items", {}), docs, path + "[]")
    if kind == "object":
        return _object(ours, theirs, docs, path)
    return []


def _object(ours: dict, theirs: dict, docs: tuple[dict, dict], path: str) -> list[str]:
    problems = []
    have, required = ours.get("properties", {}), set(ours.get("required", []))
    for name in theirs.get("required", []):
        if name not in required:
            problems.append(f"{path}.{name}: the client requires it; ours does not send it always")
    for name, theirs_field in theirs.get("properties", {}).items():
        if name in have:
            problems += compatible(have[name], theirs_field, docs, f"{path}.{name}")
    extra = theirs.get("additionalProperties")
    if isinstance(extra, dict):
        problems += compatible(ours.get("additionalProperties", {}), extra, docs, path + "{}")
    return problems


def compatible(ours: dict, theirs: dict, docs: tuple[dict, dict], path: str = "$") -> list[str]:
    """Problems that keep a value valid for our schema from parsing as the client's (empty when
    none): each of our alternatives must fit one of theirs."""
    problems = []
    for mine in _alternatives(ours, docs[0]):
        tries = [_one(mine, alt, docs, path) for alt in _alternatives(theirs, docs[1])]
        if all(tries):
            problems += min(tries, key=len)
    return problems


def reply_schema(doc: dict, path: str, method: str) -> dict:
    """The documented application/json schema of a route's 200 reply."""
    content = doc["paths"][path][method]["responses"]["200"]["content"]
    return content["application/json"]["schema"]


@pytest.fixture(scope="module")
def document(live) -> dict:
    """app.openapi() of an app over the live server (its metrics are put back after)."""
    server = live[0]
    metrics = server.metrics
    try:
        return create_app(server).openapi()
    finally:
        server.metrics = metrics


# ---------------------------------------------------------------------------- the document
@pytest.mark.parametrize(("path", "method", "client_type"), ROUTES)
def test_documented_replies_parse_as_the_clients_types(document, path, method, client_type):
    ours = reply_schema(document, path, method)
    assert _resolve(ours, document).get("properties"), f"{path}: the 200 reply is undocumented"
    theirs = client_type.model_json_schema()
    assert compatible(ours, theirs, (document, theirs)) == []


def test_streaming_routes_document_server_sent_events(document):
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}


def test_the_checker_finds_a_missing_field_and_a_wrong_type(document):
    theirs = Completion.model_json_schema()
    broken = copy.deepcopy(document)
    reply = broken["components"]["schemas"]["CompletionReply"]
    reply["required"].remove("created")
    reply["properties"]["id"] = {"type": "integer"}
    choice = broken["components"]["schemas"]["CompletionChoice"]
    choice["properties"]["finish_reason"] = {"type": "string"}  # any string: not the client's
    ours = reply_schema(broken, "/v1/completions", "post")
    problems = compatible(ours, theirs, (broken, theirs))
    assert any(p.startswith("$.created") for p in problems)
    assert any(p.startswith("$.id: ours is integer") for p in problems)
    assert any(p.startswith("$.choices[].finish_reason") for p in problems)


# ---------------------------------------------------------------------------- live replies
def test_live_replies_validate_with_the_clients_and_our_types(live):
    server, _, ids, url = live
    base = f"{url}/v1"
    listing = httpx.get(f"{base}/models", timeout=30).json()
    assert SyncPage[Model].model_validate(listing).data[1].id in ids
    ModelList.model_validate(listing)
    card = httpx.get(f"{base}/models/{ids[0]}", timeout=30).json()
    assert Model.model_validate(card).id == ids[0] and ModelCard.model_validate(card)
    asks = [("completions", {"prompt": [SOURCES[0], SOURCES[1]], "n": 2, "logprobs": 2},
             Completion, CompletionReply, 4),
            ("completions", {"prompt": SOURCES[2], "echo": True}, Completion, CompletionReply, 1),
            ("chat/completions", {"messages": [{"role": "user", "content": SOURCES[3]}],
                                  "logprobs": True, "top_logprobs": 2},
             ChatCompletion, ChatCompletionReply, 1)]  # fmt: skip
    for route, fields, client_type, ours, count in asks:
        body = {"model": ids[1], "max_tokens": 6, "temperature": 0, **fields}
        reply = httpx.post(f"{base}/{route}", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        parsed, documented = client_type.model_validate(reply.json()), ours(**reply.json())
        assert parsed.usage.completion_tokens >= 1
        assert len(parsed.choices) == len(documented.choices) == count
    assert parsed.choices[0].logprobs.content[0].top_logprobs  # the chat reply, with logprobs
