"""A drain that times out ends OpenAI requests too: a streamed one gets an error event (503)
and [DONE], a plain one a 503 in OpenAI's schema, and their rows leave the batch."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from test_serve_hostile import _slow_steps, _Uvicorn, _wait_until, configured

import test_serve
from test_serve import SOURCES, _fresh_scheduler

served = test_serve.served  # this module's own server: the drain stops it

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_timed_out_drain_ends_streamed_and_plain_openai_requests(served):
    server, _, ids = served
    server.scheduler = _fresh_scheduler(server, max_batch_size=4, max_wait_ms=0, eos_token_id=-1)
    _slow_steps(server.scheduler, 0.2)  # 30 steps: 6 s, far past the drain timeout
    body = {"model": ids[0], "prompt": SOURCES[0], "max_tokens": 30, "temperature": 0}
    streamed: list[str] = []
    plain: list = []
    with configured(server, drain_timeout=0.3):
        live = _Uvicorn(server)

        def stream() -> None:
            with httpx.stream("POST", f"{live.url}/v1/completions", timeout=30,
                              json={**body, "stream": True}) as reply:  # fmt: skip
                streamed.extend(line for line in reply.iter_lines() if line)

        def whole() -> None:
            reply = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
            plain.append((reply.status_code, reply.json(), reply.headers.get("retry-after")))

        threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for thread in threads:
            thread.start()
        assert _wait_until(lambda: server.scheduler.stats()["running"] == 2)
        begun = time.monotonic()
        live.uv.begin_drain()
        for thread in threads:
            thread.join(30)
        live.thread.join(30)
    assert not live.thread.is_alive() and time.monotonic() - begun < 3
    assert streamed[-1] == "data: [DONE]" and '"service_unavailable_error"' in streamed[-2]
    status, error, retry = plain[0]
    assert status == 503 and retry == "1" and error["error"]["type"] == "service_unavailable_error"
    assert server.scheduler.stats()["running"] == 0
    assert server.scheduler.counters["requests"] == 0  # neither ran to its end
