"""The OpenAI routes' errors against the live server: OpenAI's error schema with the right
status (404 unknown model, 400 bad fields naming the field, 413, 429/503 with Retry-After, 401
without the API key), and the API key's reach."""

from __future__ import annotations

import httpx
import openai
import pytest
import test_openai_api
from test_openai_api import CHAT_TEMPLATE, client
from test_serve_hostile import configured

from test_serve import _fresh_scheduler

served, live = test_openai_api.served, test_openai_api.live

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- errors
def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_unknown_model_is_a_404_in_openais_schema(live):
    _, _, _, url = live
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="x", max_tokens=2)
    error = _error(httpx.post(f"{url}/v1/chat/completions", timeout=10, json={
        "model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)  # fmt: skip
    assert error["param"] == "model" and error["code"] == "model_not_found"


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"max_tokens": "4"}, "max_tokens"),
    ({"temperature": 3}, "temperature"), ({"max_tokens": 10_000}, "max_tokens"),
    ({"presence_penalty": 1.0}, None), ({"unknown": 1}, "unknown"), ({"num_beams": 99}, "num_beams"),
    ({"logprobs": 2, "num_beams": 2}, "logprobs"),
])  # fmt: skip
def test_bad_fields_are_400_naming_the_field(live, fields, param):
    _, _, _, url = live
    body = {"model": "p0", "prompt": "x", "max_tokens": 2, **fields}
    error = _error(httpx.post(f"{url}/v1/completions", json=body, timeout=10), 400)
    assert param is None or param in (error["param"] or ""), error
    assert error["type"] == "invalid_request_error"


def test_too_long_is_413_and_a_full_queue_429_with_retry_after(live):
    server, _, _, url = live
    _error(httpx.post(f"{url}/v1/completions", timeout=10, json={
        "model": "p0", "prompt": "word " * 300, "max_tokens": 2}), 413)  # fmt: skip
    old = server.scheduler
    server.scheduler = _fresh_scheduler(server, max_queue=1, max_batch_size=8,
                                        max_wait_ms=60_000).start()  # fmt: skip
    try:
        reply = httpx.post(f"{url}/v1/completions", timeout=10, json={
            "model": "p0", "prompt": "x", "max_tokens": 2, "n": 2})  # fmt: skip
        _error(reply, 429)
        assert reply.headers["retry-after"] == "1"
        assert server.scheduler.stats()["waiting"] == 0  # the first row was withdrawn
    finally:
        server.scheduler.close(10)
        server.scheduler = old


def test_draining_is_503_with_retry_after(live):
    server, _, _, url = live
    server.draining = True
    try:
        reply = httpx.get(f"{url}/v1/models", timeout=10)
    finally:
        server.draining = False
    _error(reply, 503)
    assert reply.headers["retry-after"] == "1"


def test_api_key_is_required_on_client_endpoints_only(live):
    server, _, _, url = live
    with configured(server, api_key="k3y"):
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0).models.list()
        error = _error(httpx.post(f"{url}/v1/completions", json={"model": "p0", "prompt": "x"},
                                  timeout=10), 401)  # fmt: skip
        assert error["code"] == "invalid_api_key"
        native = httpx.post(f"{url}/v1/generate", json={"input": "x"}, timeout=10)
        assert native.status_code == 401 and "detail" in native.json()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        # admin endpoints keep their own token (test_serve.ADMIN), not the api key
        admin = httpx.delete(f"{url}/v1/admin/prefixes/zzz", timeout=10,
                             headers={"Authorization": "Bearer k3y"})  # fmt: skip
        assert admin.status_code == 401


def test_a_public_address_accepts_an_api_key():
    from prefixtune.serving.app import ServeConfig

    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"


def test_chat_without_a_template_is_a_400(live):
    server, _, _, url = live
    server.tokenizer.chat_template = None
    try:
        error = _error(httpx.post(f"{url}/v1/chat/completions", timeout=10, json={
            "model": "p0", "messages": [{"role": "user", "content": "x"}]}), 400)  # fmt: skip
    finally:
        server.tokenizer.chat_template = CHAT_TEMPLATE
    assert error["param"] == "messages" and "/v1/completions" in error["message"]
