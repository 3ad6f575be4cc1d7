"""Serving as a hostile client meets it: odd JSON, odd types, huge bodies, odd files, admin
calls without rights, paths that leak or escape, shutdown and disconnects mid-request.
No input may produce a 500 or a hang; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from prefixtune.config import ConfigError
from prefixtune.core.artifact import PREFIX_JSON, PREFIX_TENSORS, ArtifactError, save_prefix
from prefixtune.core.atomic_files import sha256_file
from prefixtune.core.prefix_encoder import model_shapes
from prefixtune.serving.app import ServeConfig

import test_serve
from test_serve import ADMIN, SOURCES, _free_port, _fresh_scheduler, call, random_prefix

served = test_serve.served  # the module-scoped fixture: a tiny GPT-2 server with 8 prefixes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@contextlib.contextmanager
def configured(server, **values):
    """Set ServeConfig fields for one test, restoring them after."""
    old = {name: getattr(server.config, name) for name in values}
    for name, value in values.items():
        setattr(server.config, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(server.config, name, value)


def post_raw(server, content, headers=None):
    """POST raw bytes (or a byte generator: chunked) to /v1/generate."""
    headers = {"content-type": "application/json", **(headers or {})}

    async def body(client):
        return await client.post("/v1/generate", content=content, headers=headers)

    return call(server, body)


# ---------------------------------------------------------------------------- hostile JSON
HOSTILE_BODIES = {
    "nan_temperature": b'{"input": "x", "temperature": NaN}',
    "inf_length_penalty": b'{"input": "x", "length_penalty": Infinity}',
    "nan_seed": b'{"input": "x", "seed": -Infinity}',
    "nan_input": b'{"input": NaN}',
    "nan_prefix": b'{"input": "x", "prefix": NaN}',
    "surrogate_escape": b'{"input": "ab\\ud800cd"}',
    "surrogate_bytes": b'{"input": "ab\xed\xa0\x80cd"}',
    "surrogate_key": b'{"input": "x", "\\udc80": 1}',
    "surrogate_prefix": b'{"input": "x", "prefix": "\\ud800"}',
    "nan_in_model_error": b'{"input": "x", "do_sample": true, "num_beams": 2, "t": [NaN]}',
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_non_finite_numbers_and_lone_surrogates_get_422_not_500(served, name):
    server, _, _ = served
    response = post_raw(server, HOSTILE_BODIES[name])
    assert response.status_code == 422, response.text
    assert "detail" in json.loads(response.content)  # a real, serialisable JSON reply


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", "4"), ("max_new_tokens", True), ("max_new_tokens", 4.0),
     ("do_sample", "yes"), ("do_sample", 1), ("early_stopping", "true"),
     ("temperature", "1.5"), ("seed", "7"), ("prefix", 3), ("input", 5)],
)  # fmt: skip
def test_request_types_are_strict(served, field, value):
    server, _, _ = served
    response = post_raw(server, json.dumps({"input": "x", field: value}).encode())
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])


def test_an_integer_is_still_a_valid_float(served):
    server, _, _ = served
    body = {"input": SOURCES[0], "temperature": 1, "top_p": 1, "max_new_tokens": 2}
    assert post_raw(server, json.dumps(body).encode()).status_code == 200


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", 1e-300), ("temperature", 0.001), ("top_p", 1e-300)]
)
def test_sampling_parameters_have_floors(served, field, value):
    server, _, _ = served
    body = {"input": "x", "do_sample": True, field: value}
    response = post_raw(server, json.dumps(body).encode())
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


def test_error_replies_echo_only_a_short_excerpt(served):
    server, _, _ = served
    huge = "a" * 400_000  # a model-level error echoes the whole body by default
    bodies = [{"input": huge, "do_sample": True, "num_beams": 2},
              {"input": list(range(50_000))}, {"input": "x", "prefix": huge}]  # fmt: skip
    with configured(server, max_body_bytes=10_000_000):
        for body in bodies:
            response = post_raw(server, json.dumps(body).encode())
            assert response.status_code == 422
            assert len(response.content) < 2_000, response.content[:300]


def test_a_non_json_body_gets_415(served):
    server, _, _ = served
    response = post_raw(server, b"hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_the_body_limit_holds_before_parsing(served):
    server, _, _ = served
    too_big = b'{"input": "' + b"a" * 3_000  # over the limit and not even JSON: 413, not 422

    async def chunks():  # no Content-Length: sent chunked
        for _ in range(30):
            yield b"a" * 100

    with configured(server, max_body_bytes=1_000):
        declared = post_raw(server, too_big)
        chunked = post_raw(server, chunks())
        small = post_raw(server, json.dumps({"input": SOURCES[0], "max_new_tokens": 2}).encode())
    assert declared.status_code == 413 and "--max-body-bytes" in declared.json()["detail"]
    assert chunked.status_code == 413 and "--max-body-bytes" in chunked.json()["detail"]
    assert small.status_code == 200


def test_max_body_bytes_must_be_positive():
    with pytest.raises(ConfigError, match="--max-body-bytes"):
        ServeConfig(max_body_bytes=0)


# ---------------------------------------------------------------------------- event loop
def test_tokenisation_runs_off_the_event_loop(served, monkeypatch):
    """While one long input is being tokenised, /health still answers at once."""
    server, _, _ = served
    started, release = threading.Event(), threading.Event()
    released_in_time: list[bool] = []
    real_prompt = type(server).prompt

    def slow_prompt(self, text, meta):
        started.set()  # a blocking tokenizer: on the event loop, nothing else runs until it ends
        released_in_time.append(release.wait(3))
        return real_prompt(self, text, meta)

    monkeypatch.setattr(type(server), "prompt", slow_prompt)

    async def body(client):
        busy = asyncio.create_task(
            client.post("/v1/generate", json={"input": SOURCES[0], "max_new_tokens": 2})
        )
        while not started.is_set():
            await asyncio.sleep(0.005)
        health = await client.get("/health")  # answered while the tokenizer still runs...
        release.set()  # ...which only then may finish
        return health, await busy

    health, busy = call(server, body)
    assert health.status_code == 200 and busy.status_code == 200
    assert released_in_time == [True]


# ---------------------------------------------------------------------------- who may do what
def test_admin_endpoints_are_off_without_a_token(served):
    server, _, _ = served

    async def body(client):
        load = await client.post("/v1/admin/prefixes", json={"id": "p9", "path": "p0"})
        unload = await client.delete("/v1/admin/prefixes/p0")
        return load, unload

    with configured(server, admin_token=""):
        load, unload = call(server, body)
    for response in (load, unload):
        assert response.status_code == 403 and "--admin-token" in response.json()["detail"]
    assert "p0" in server.bank


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(b"bearer s3cret", 409), (b"BEARER  s3cret ", 409), (b"Bearer s3cr\xc3\xa9t", 401),
     (b"Bearer \xff\xfe", 401), (b"Basic s3cret", 401), (b"s3cret", 401)],
)  # fmt: skip
def test_bearer_scheme_is_case_insensitive_and_odd_headers_get_401(served, authorization, status):
    server, _, _ = served

    async def body(client):
        return await client.post("/v1/admin/prefixes", json={"id": "p0", "path": "p0"},
                                 headers={"Authorization": authorization})  # fmt: skip

    response = call(server, body)
    assert response.status_code == status, response.text  # 409: past the guard, p0 exists


def test_hot_load_paths_stay_inside_the_prefixes_directory(served, tmp_path):
    server, root, _ = served
    shapes = model_shapes(server.model)
    save_prefix(tmp_path / "outside", random_prefix(shapes, 2), base_model="tiny")
    (root / "link-out").symlink_to(tmp_path / "outside")
    save_prefix(root / "inside", random_prefix(shapes, 2), base_model="tiny")

    async def load(client, prefix_id, path):
        body = {"id": prefix_id} if path is None else {"id": prefix_id, "path": path}
        return await client.post("/v1/admin/prefixes", json=body, headers=ADMIN)

    async def body(client):
        return {
            "dotdot": await load(client, "a", f"../{tmp_path.name}/outside"),
            "absolute": await load(client, "b", str(tmp_path / "outside")),
            "symlink": await load(client, "c", "link-out"),
            "symlink_by_id": await load(client, "link-out", None),
            "inside": await load(client, "inside", "inside"),
            "inside_abs": await load(client, "inside2", str(root / "inside")),
        }

    try:
        with configured(server, allow_any_prefix_path=False):
            r = call(server, body)
        with configured(server, allow_any_prefix_path=True):
            allowed = call(server, lambda c: load(c, "outside", str(tmp_path / "outside")))
    finally:
        for prefix_id in ("inside", "inside2", "outside"):
            if prefix_id in server.bank:
                server.bank.remove(prefix_id)
        (root / "link-out").unlink()
    for name in ("dotdot", "absolute", "symlink", "symlink_by_id"):
        assert r[name].status_code == 403, (name, r[name].text)
        assert "--allow-any-prefix-path" in r[name].json()["detail"]
        assert str(tmp_path) not in r[name].text
    assert r["inside"].status_code == 201 and r["inside_abs"].status_code == 201
    assert str(root) not in r["inside"].text
    assert allowed.status_code == 201


def test_listing_and_health_reveal_no_filesystem_paths(served):
    server, root, _ = served

    async def body(client):
        return await client.get("/v1/prefixes"), await client.get("/health")

    listing, health = call(server, body)
    assert listing.json()["errors"]["bad"]  # the load error is still explained...
    for response in (listing, health):
        assert str(root) not in response.text and str(root.parent) not in response.text
    assert {p["path"] for p in listing.json()["prefixes"]} >= {"p0", "run7/prefix"}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "::", "example.com", ""])
def test_a_public_address_needs_a_token_or_an_explicit_flag(host):
    with pytest.raises(ConfigError, match="--allow-public"):
        ServeConfig(host=host)
    ServeConfig(host=host, admin_token="t")
    ServeConfig(host=host, allow_public=True)


def test_loopback_addresses_need_no_flag():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServeConfig(host=host)


# ---------------------------------------------------------------------------- hostile files
def _write_meta(directory: Path, meta) -> None:
    (directory / PREFIX_JSON).write_bytes(meta if isinstance(meta, bytes) else
                                          json.dumps(meta).encode())  # fmt: skip


def _artifact(tmp_path, model, kind: str) -> Path:
    """A prefix directory with one hostile property."""
    directory = tmp_path / kind
    save_prefix(directory, random_prefix(model_shapes(model), 2), base_model="tiny")
    meta = json.loads((directory / PREFIX_JSON).read_text())
    tensors = directory / PREFIX_TENSORS
    if kind == "json_list":
        _write_meta(directory, [1, 2])
    elif kind == "json_latin1":
        _write_meta(directory, json.dumps(meta).replace("tiny", "t\xefny").encode("latin-1"))
    elif kind == "json_nan":
        _write_meta(directory, json.dumps({**meta, "base_model": float("nan")}).encode())
    elif kind == "json_surrogate":
        _write_meta(directory, json.dumps({**meta, "base_model": "\ud800"}).encode())
    elif kind in ("three_d", "no_tensors", "nan_values", "inf_values", "zero_positions"):
        shape = model_shapes(model)["self"]
        full = torch.randn(shape.layers, 2, shape.heads, 2, shape.head_dim)
        tensor = {"three_d": torch.randn(2, 3, 4), "no_tensors": None,
                  "nan_values": full.index_fill(3, torch.tensor([1]), float("nan")),
                  "inf_values": full.index_fill(3, torch.tensor([0]), float("inf")),
                  "zero_positions": full[:, :, :, :0]}[kind]  # fmt: skip
        data = {} if tensor is None else {"self": tensor.contiguous()}
        save_file(data, str(tensors), metadata={"format": "prefixtune-prefix"})
        shapes = {k: [t.shape[0], t.shape[2], t.shape[-1]] if t.dim() == 5 else list(t.shape)
                  for k, t in data.items()}  # fmt: skip
        _write_meta(directory, {**meta, "shapes": shapes, "sha256": sha256_file(tensors)})
    elif kind == "zero_bytes":
        tensors.write_bytes(b"")
        _write_meta(directory, {**meta, "sha256": None})
    elif kind == "fifo_tensors":
        tensors.unlink()
        os.mkfifo(tensors)
    elif kind == "fifo_tensors_no_sha":
        tensors.unlink()
        os.mkfifo(tensors)
        _write_meta(directory, {**meta, "sha256": None})
    elif kind == "dev_zero_link":
        tensors.unlink()
        tensors.symlink_to("/dev/zero")
    return directory


HOSTILE_FILES = {
    "json_list": "not a JSON object", "json_latin1": "UTF-8", "json_nan": "non-finite",
    "json_surrogate": "UTF-8", "three_d": "5 dimensions", "no_tensors": "no tensors",
    "nan_values": "non-finite", "inf_values": "non-finite", "zero_positions": "no positions",
    "zero_bytes": "corrupt", "fifo_tensors": "not a regular file",
    "fifo_tensors_no_sha": "not a regular file", "dev_zero_link": "not a regular file",
}  # fmt: skip


def _bounded(fn, timeout: float, fifo: Path):
    """Run fn in a thread; a reader stuck on a FIFO is released and the test fails."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if fifo.exists():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the stuck reader
        thread.join(5)
        pytest.fail("loading hung on a non-regular file")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.parametrize("kind", list(HOSTILE_FILES))
def test_hostile_artifacts_are_refused_with_a_clear_error(served, tmp_path, kind):
    server, _, _ = served
    directory = _artifact(tmp_path, server.model, kind)
    fifo = directory / PREFIX_TENSORS
    with pytest.raises(ArtifactError, match=HOSTILE_FILES[kind]):
        _bounded(lambda: server.bank.load("hostile", directory, replace=True), 5, fifo)
    assert "hostile" not in server.bank


@pytest.mark.parametrize("kind", ["json_list", "json_latin1", "three_d", "no_tensors", "json_nan"])
def test_hot_loading_a_hostile_artifact_is_a_422_and_the_listing_still_works(
    served, tmp_path, kind
):
    server, _, _ = served
    directory = _artifact(tmp_path, server.model, kind)

    async def body(client):
        load = await client.post("/v1/admin/prefixes", headers=ADMIN,
                                 json={"id": "hostile", "path": str(directory)})  # fmt: skip
        return load, await client.get("/v1/prefixes")

    with configured(server, allow_any_prefix_path=True):
        load, listing = call(server, body)
    assert load.status_code == 422, load.text
    assert listing.status_code == 200 and "hostile" not in listing.text


def test_non_finite_values_in_the_model_dtype_are_refused(served, tmp_path):
    """A value that is finite in fp32 but overflows the serving dtype (fp16) is refused too."""
    server, _, _ = served
    directory = tmp_path / "big"
    shapes = model_shapes(server.model)
    save_prefix(directory, {k: v * 0 + 1e6 for k, v in random_prefix(shapes, 2).items()},
                base_model="tiny")  # fmt: skip
    from prefixtune.serving.bank import PrefixBank

    bank = PrefixBank(server.model.half())
    try:
        with pytest.raises(ArtifactError, match="non-finite.*float16"):
            bank.load("big", directory)
    finally:
        server.model.float()


# ---------------------------------------------------------------------------- shutdown, disconnect
def _slow_steps(scheduler, seconds: float):
    """Make every decode step of this scheduler take at least `seconds` (a long generation)."""
    step = scheduler._decode_step

    def slow():
        if len(scheduler._running):
            time.sleep(seconds)
        step()

    scheduler._decode_step = slow


class _Uvicorn:
    """A real server on 127.0.0.1 in a thread, built by serve_forever's own class."""

    def __init__(self, server):
        from prefixtune.serving.lifecycle import DrainingServer

        self.port = _free_port()
        self.uv = DrainingServer(server, host="127.0.0.1", port=self.port, log_level="warning")
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.uv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.uv.started
        self.url = f"http://127.0.0.1:{self.port}"


def _post_in_thread(url, body, results, timeout=30.0):
    def client():
        try:
            response = httpx.post(f"{url}/v1/generate", json=body, timeout=timeout)
            results.append(response.status_code)
        except httpx.TimeoutException:
            results.append("timeout")

    thread = threading.Thread(target=client)
    thread.start()
    return thread


def _wait_until(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_drain_answers_new_requests_503_and_finishes_in_flight_ones(served):
    server, _, ids = served
    server.scheduler = _fresh_scheduler(server, max_batch_size=4, max_wait_ms=0)
    _slow_steps(server.scheduler, 0.02)
    live = _Uvicorn(server)
    results: list = []
    clients = [_post_in_thread(live.url, {"prefix": ids[i], "input": SOURCES[i],
                                          "max_new_tokens": 24}, results)
               for i in range(3)]  # fmt: skip
    assert _wait_until(lambda: server.scheduler.stats()["running"] == 3)
    live.uv.begin_drain()  # what SIGTERM/SIGINT call
    assert _wait_until(lambda: server.draining)
    late = httpx.post(f"{live.url}/v1/generate", json={"input": "x"}, timeout=10)
    health = httpx.get(f"{live.url}/health", timeout=10)
    for c in clients:
        c.join(30)
    live.thread.join(30)
    assert late.status_code == 503 and late.headers["retry-after"]
    assert health.json()["status"] == "draining" and health.status_code == 503
    assert results == [200] * 3
    assert not live.thread.is_alive()


def test_drain_timeout_answers_the_rest_503_and_removes_their_rows(served):
    server, _, ids = served
    server.scheduler = _fresh_scheduler(server, max_batch_size=4, max_wait_ms=0)
    _slow_steps(server.scheduler, 0.2)  # 30 steps: 6 s, far past the drain timeout
    with configured(server, drain_timeout=0.3):
        live = _Uvicorn(server)
        results: list = []
        clients = [_post_in_thread(live.url, {"prefix": ids[i], "input": SOURCES[i],
                                              "max_new_tokens": 30}, results)
                   for i in range(2)]  # fmt: skip
        assert _wait_until(lambda: server.scheduler.stats()["running"] == 2)
        begun = time.monotonic()
        live.uv.begin_drain()
        for c in clients:
            c.join(30)
        live.thread.join(30)
    assert results == [503, 503]
    assert not live.thread.is_alive() and time.monotonic() - begun < 3
    assert server.scheduler.stats()["running"] == 0


def test_a_disconnected_client_leaves_the_batch(served):
    server, _, ids = served
    server.scheduler = _fresh_scheduler(server, max_batch_size=4, max_wait_ms=0)
    _slow_steps(server.scheduler, 0.2)  # 30 steps: 6 s
    live = _Uvicorn(server)
    results: list = []
    try:
        gone = _post_in_thread(live.url, {"prefix": ids[0], "input": SOURCES[0],
                                          "max_new_tokens": 30}, results, timeout=0.5)  # fmt: skip
        assert _wait_until(lambda: server.scheduler.stats()["running"] == 1 or results), results
        gone.join(10)
        assert results == ["timeout"]
        begun = time.monotonic()
        assert _wait_until(lambda: server.scheduler.stats()["running"] == 0, timeout=3)
        assert time.monotonic() - begun < 1.5  # at the next steps, not after 30 of them
    finally:
        live.uv.begin_drain()
        live.thread.join(30)


@pytest.mark.slow
def test_sigterm_drains_and_exits_with_status_0(served):
    """The real command: SIGTERM while idle ends `prefixtune serve` with exit status 0."""
    import signal

    server, _, _ = served
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prefixtune", "serve", "--model",
                             server.config.model, "--port", str(port), "--device", "cpu",
                             "--drain-timeout", "5"], env=env)  # fmt: skip
    try:
        assert _wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
