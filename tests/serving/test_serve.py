"""Serving: the prefix bank, the scheduler (continuous and request-level batching) and the HTTP
API on tiny models saved to a temp dir, with random folded prefixes of different lengths.
Only loopback addresses; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from prefixtune.config import GenerateConfig
from prefixtune.core.artifact import ArtifactError, load_prefix, save_prefix
from prefixtune.core.prefix_encoder import model_shapes
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import prompt_ids
from prefixtune.evaluation.predictor import Predictor
from prefixtune.generation.engine import generate
from prefixtune.serving.app import ServeConfig, build_server, create_app
from prefixtune.serving.bank import PrefixBank
from prefixtune.serving.scheduler import Scheduler

from conftest import TOKENIZER_VOCAB, tiny_bart, tiny_gemma3, tiny_gpt2, tiny_llama

LENGTHS = (1, 3, 5, 2, 4, 6, 2, 3)  # eight tenants, mixed prefix lengths
GREEDY = GenerateConfig(max_new_tokens=8)
SOURCES = [e.source for e in builtin_examples("dev")[:8]]
ADMIN_TOKEN = "s3cret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # admin endpoints are off without a token


def random_prefix(shapes, length: int, scale: float = 2.0) -> dict[str, torch.Tensor]:
    return {kind: torch.randn(s.layers, 2, s.heads, length, s.head_dim) * scale
            for kind, s in shapes.items()}  # fmt: skip


def save_prefixes(root, model, lengths=LENGTHS) -> list[str]:
    shapes = model_shapes(model)
    ids = []
    for i, length in enumerate(lengths):
        save_prefix(root / f"p{i}", random_prefix(shapes, length), base_model="tiny")
        ids.append(f"p{i}")
    return ids


def expected_texts(model, tokenizer, root, prefix_id, sources, config=GREEDY) -> list[str]:
    """What evaluate.Predictor gives for these sources with this one prefix (or none)."""
    prefix = None if prefix_id is None else load_prefix(root / prefix_id)
    return Predictor(model, tokenizer, prefix, max_source_tokens=10_000).predict(sources, config)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def served(tmp_path_factory, bpe_tokenizer):
    """A tiny GPT-2 saved to disk, 8 prefixes + a run dir + a bad artifact, loaded by a Server."""
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(TOKENIZER_VOCAB).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    root = tmp_path_factory.mktemp("prefixes")
    config = ServeConfig(model=str(model_dir), prefixes=str(root), max_batch_size=8,
                         max_wait_ms=20, max_input_tokens=100, max_new_tokens_limit=32,
                         device="cpu", admin_token=ADMIN_TOKEN,
                         allow_any_prefix_path=True)  # tests hot-load from tmp dirs  # fmt: skip
    server = build_server(config)  # loads the model; prefixes are written next
    ids = save_prefixes(root, server.model)
    save_prefix(root / "run7" / "prefix", random_prefix(model_shapes(server.model), 3),
                base_model="tiny")  # fmt: skip
    other = tiny_llama(TOKENIZER_VOCAB)  # 2 kv heads x head_dim 8: does not fit GPT-2
    save_prefix(root / "bad", random_prefix(model_shapes(other), 2), base_model="llama")
    server.bank.load_dir(root)
    return server, root, ids


async def _with_client(server, body):
    """Run `body(client)` against the app with its lifespan (scheduler started and drained)."""
    app = create_app(server)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await asyncio.wait_for(body(client), timeout=60)


def call(server, body):
    server.scheduler = _fresh_scheduler(server)
    return asyncio.run(_with_client(server, body))


def _fresh_scheduler(server, **overrides) -> Scheduler:
    c = server.config
    options = dict(eos_token_id=server.tokenizer.eos_token_id,
                   pad_token_id=server.tokenizer.pad_token_id, max_batch_size=c.max_batch_size,
                   max_wait_ms=c.max_wait_ms)  # fmt: skip
    return Scheduler(server.model, server.bank, **{**options, **overrides})


# ---------------------------------------------------------------------------- bank
def test_bank_loads_dirs_and_run_dirs_skips_a_bad_artifact(served):
    server, _, ids = served
    listing = server.bank.describe()
    assert [p["id"] for p in listing["prefixes"]] == sorted([*ids, "run7"])
    bytes_of = {p["id"]: p["bytes"] for p in listing["prefixes"]}
    shape = server.bank.shapes["self"]
    assert bytes_of["p2"] == 5 * shape.width * 4  # 5 positions x 2*L*H*D fp32 numbers
    assert listing["total_bytes"] == sum(bytes_of.values())
    assert "bad" in listing["errors"] and "kv heads" in listing["errors"]["bad"]


def test_bank_gather_stacks_distinct_prefixes_with_rows(served):
    server, _, _ = served
    prefix = server.bank.gather(["p2", None, "p0", "p2"])
    assert prefix.kv["self"].shape[0] == 3  # p2, none, p0
    assert prefix.rows.tolist() == [0, 1, 2, 0]
    assert prefix.valid.sum(-1).tolist() == [5, 0, 1]
    assert server.bank.gather([None, None]) is None


# ---------------------------------------------------------------------------- scheduler
def test_mixed_batch_equals_separate_single_prefix_runs(served):
    """N requests over N prefixes (and none) in ONE batch == N separate Predictor runs."""
    server, root, ids = served
    tenants = [None, *ids]
    scheduler = _fresh_scheduler(server, max_batch_size=len(tenants), max_wait_ms=2000).start()
    try:
        sources = [SOURCES[i % len(SOURCES)] for i in range(len(tenants))]
        futures = [scheduler.submit(prompt_ids(s, server.tokenizer), t, GREEDY)
                   for s, t in zip(sources, tenants, strict=True)]  # fmt: skip
        results = [f.result(timeout=30) for f in futures]
    finally:
        scheduler.close(10)
    assert {r.batch_rows for r in results} == {len(tenants)}  # one mixed batch
    texts = [server.text(r.tokens) for r in results]
    want = [expected_texts(server.model, server.tokenizer, root, t, [s])[0]
            for s, t in zip(sources, tenants, strict=True)]  # fmt: skip
    assert texts == want
    assert len(set(texts)) > len(tenants) // 2  # the prefixes really differ


def test_rows_join_and_leave_between_decode_steps(served):
    """Continuous batching: late rows join a running batch and rows end at different steps
    (the EOS set holds tokens the rows produce at different points; n-gram blocking keeps the
    random model from repeating itself); each row equals its own generate() run."""
    server, root, ids = served
    model, tok = server.model, server.tokenizer
    config = GenerateConfig(max_new_tokens=16, no_repeat_ngram_size=1)
    jobs = [(prompt_ids(SOURCES[i], tok), ids[i % len(ids)] if i % 3 else None) for i in range(8)]

    def alone(prompt, tenant, eos):
        ids_ = torch.tensor([prompt])
        prefix = None if tenant is None else load_prefix(root / tenant).to_prefix_kv()
        return generate(model, ids_, torch.ones_like(ids_), prefix, config, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id)[0]  # fmt: skip

    free = [alone(p, t, tok.eos_token_id) for p, t in jobs]
    eos = [tok.eos_token_id, *{row[2 + i] for i, row in enumerate(free[:6])}]
    want = [alone(p, t, eos) for p, t in jobs]
    scheduler = _fresh_scheduler(server, eos_token_id=eos, max_batch_size=4, max_wait_ms=0)
    scheduler.start()
    try:
        futures = []
        for prompt, tenant in jobs:
            futures.append(scheduler.submit(prompt, tenant, config))
            time.sleep(0.005)
        results = [f.result(timeout=30) for f in futures]
    finally:
        scheduler.close(10)
    assert [r.tokens for r in results] == want
    assert scheduler.stats()["batches"] >= 2
    assert len({len(r.tokens) for r in results}) > 2


@pytest.mark.slow  # inductor compiles C++ for a minute or more
def test_compiled_continuous_batching_serves_the_same_tokens(served):
    """serve --compile: rows join a running batch of the compiled model; same tokens."""
    from torch._dynamo.utils import counters

    server, _, ids = served
    tok = server.tokenizer
    jobs = [(prompt_ids(SOURCES[i], tok), ids[i % len(ids)] if i % 3 else None) for i in range(6)]

    def serve_all(**options) -> list[list[int]]:
        scheduler = _fresh_scheduler(server, max_batch_size=3, max_wait_ms=0, **options).start()
        try:
            futures = [scheduler.submit(prompt, tenant, GREEDY) for prompt, tenant in jobs]
            return [f.result(timeout=600).tokens for f in futures]
        finally:
            scheduler.close(10)

    eager = serve_all()
    counters.clear()
    assert serve_all(compile=True) == eager
    assert counters["stats"]["unique_graphs"] > 0  # the forward really ran compiled


def test_sampling_follows_the_request_seed_whatever_the_batch(served):
    server, root, ids = served
    tok = server.tokenizer
    config = GenerateConfig(max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.9, seed=5)
    prompt = prompt_ids(SOURCES[0], tok)
    alone = torch.tensor([prompt])
    want = generate(server.model, alone, torch.ones_like(alone),
                    load_prefix(root / "p1").to_prefix_kv(), config,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0]  # fmt: skip
    scheduler = _fresh_scheduler(server, max_wait_ms=200).start()
    try:
        others = [scheduler.submit(prompt_ids(s, tok), ids[3], GREEDY) for s in SOURCES[1:4]]
        mine = scheduler.submit(prompt, "p1", config)
        assert mine.result(timeout=30).tokens == want
        assert all(f.result(timeout=30) for f in others)
    finally:
        scheduler.close(10)


@pytest.mark.parametrize(
    ("arch", "mode"), [("llama", "continuous"), ("gemma3", "dynamic"), ("bart", "dynamic")]
)
def test_other_architectures_mix_prefixes_in_one_batch(arch, mode, bpe_tokenizer, tmp_path):
    """Llama (RoPE, GQA) decodes continuously; sliding-window (Gemma-3) and encoder-decoder
    (BART) models, whose cache cannot hold prefixes, batch per request through generate()."""
    torch.manual_seed(0)
    builders = {"llama": lambda: tiny_llama(TOKENIZER_VOCAB), "gemma3": _gemma3,
                "bart": lambda: tiny_bart(TOKENIZER_VOCAB)}  # fmt: skip
    model = builders[arch]()
    save_prefixes(tmp_path, model, lengths=(2, 4, 3))
    bank = PrefixBank(model)
    assert bank.load_dir(tmp_path) == {}
    tok = bpe_tokenizer
    scheduler = Scheduler(model, bank, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, max_wait_ms=200).start()  # fmt: skip
    assert scheduler.stats()["mode"] == mode
    tenants = [None, "p0", "p1", "p2"]
    plain = Predictor(model, tok, max_source_tokens=10_000)
    try:
        futures = [scheduler.submit(plain.prompt(s), t, GREEDY)
                   for s, t in zip(SOURCES, tenants, strict=False)]  # fmt: skip
        results = [f.result(timeout=30) for f in futures]
    finally:
        scheduler.close(10)
    assert {r.batch_rows for r in results} == {len(tenants)}
    for source, tenant, result in zip(SOURCES, tenants, results, strict=False):
        folded = None if tenant is None else load_prefix(tmp_path / tenant)
        want = Predictor(model, tok, folded, max_source_tokens=10_000).predict([source], GREEDY)
        assert tok.decode(result.tokens, skip_special_tokens=True).strip() == want[0]


def _gemma3():
    model = tiny_gemma3()  # built with a small vocabulary: make room for the BPE tokenizer's
    model.resize_token_embeddings(TOKENIZER_VOCAB)
    return model.eval()


# ---------------------------------------------------------------------------- HTTP
def test_http_64_concurrent_requests_over_8_prefixes(served):
    server, root, ids = served
    jobs = [(SOURCES[i % 5], ids[i % len(ids)]) for i in range(64)]

    async def body(client):
        posts = [client.post("/v1/generate", json={"prefix": t, "input": s, "max_new_tokens": 8})
                 for s, t in jobs]  # fmt: skip
        return await asyncio.gather(*posts)

    responses = call(server, body)
    assert [r.status_code for r in responses] == [200] * 64
    want = {t: dict(zip(SOURCES[:5], expected_texts(server.model, server.tokenizer, root, t,
                                                     SOURCES[:5]), strict=True))
            for t in ids}  # fmt: skip
    for (source, tenant), response in zip(jobs, responses, strict=True):
        data = response.json()
        assert data["text"] == want[tenant][source]
        assert data["prefix"] == tenant
        assert data["prompt_tokens"] == len(prompt_ids(source, server.tokenizer))
        assert 0 < data["completion_tokens"] <= 8 and data["finish_reason"] in ("stop", "length")


def test_http_no_prefix_and_beam_search(served):
    server, root, _ = served
    beam = GenerateConfig(max_new_tokens=6, num_beams=3)

    async def body(client):
        plain = client.post("/v1/generate", json={"prefix": None, "input": SOURCES[0],
                                                  "max_new_tokens": 8})  # fmt: skip
        beams = [client.post("/v1/generate", json={"prefix": t, "input": SOURCES[1],
                                                   "max_new_tokens": 6, "num_beams": 3})
                 for t in ("p0", "p4")]  # fmt: skip
        return await asyncio.gather(plain, *beams)

    plain, *beams = call(server, body)
    assert plain.json()["text"] == expected_texts(server.model, server.tokenizer, root, None,
                                                  SOURCES[:1])[0]  # fmt: skip
    for tenant, response in zip(("p0", "p4"), beams, strict=True):
        want = expected_texts(server.model, server.tokenizer, root, tenant, SOURCES[1:2], beam)
        assert response.json()["text"] == want[0]


def test_hot_load_while_serving_and_bad_artifacts(served, tmp_path):
    server, root, _ = served
    shapes = model_shapes(server.model)
    save_prefix(tmp_path / "fresh", random_prefix(shapes, 4), base_model="tiny")
    save_prefix(tmp_path / "alien", random_prefix(model_shapes(tiny_llama(TOKENIZER_VOCAB)), 2),
                base_model="llama")  # fmt: skip
    payload = {"prefix": "p1", "input": SOURCES[2], "max_new_tokens": 16}

    async def body(client):
        busy = [asyncio.create_task(client.post("/v1/generate", json=payload)) for _ in range(6)]
        await asyncio.sleep(0)
        loaded = await client.post(
            "/v1/admin/prefixes",
            json={"id": "fresh", "path": str(tmp_path / "fresh")},
            headers=ADMIN,
        )
        again = await client.post(
            "/v1/admin/prefixes",
            json={"id": "fresh", "path": str(tmp_path / "fresh")},
            headers=ADMIN,
        )
        alien = await client.post(
            "/v1/admin/prefixes",
            json={"id": "alien", "path": str(tmp_path / "alien")},
            headers=ADMIN,
        )
        missing = await client.post(
            "/v1/admin/prefixes", json={"id": "nothing-here"}, headers=ADMIN
        )
        used = await client.post("/v1/generate", json={"prefix": "fresh", "input": SOURCES[0],
                                                       "max_new_tokens": 8})  # fmt: skip
        listing = await client.get("/v1/prefixes")
        health = await client.get("/health")
        return loaded, again, alien, missing, used, listing, health, await asyncio.gather(*busy)

    loaded, again, alien, missing, used, listing, health, busy = call(server, body)
    try:
        assert loaded.status_code == 201 and loaded.json()["bytes"] == 4 * shapes["self"].width * 4
        assert again.status_code == 409 and "replace" in again.json()["detail"]
        assert alien.status_code == 422 and "kv heads" in alien.json()["detail"]
        assert missing.status_code == 422 and "prefix.json" in missing.json()["detail"]
        assert used.status_code == 200
        fresh = load_prefix(tmp_path / "fresh")
        want = Predictor(server.model, server.tokenizer, fresh, 10_000).predict(SOURCES[:1], GREEDY)
        assert used.json()["text"] == want[0]
        assert "fresh" in [p["id"] for p in listing.json()["prefixes"]]
        assert health.json()["status"] == "ok"
        assert [r.status_code for r in busy] == [200] * 6  # serving went on throughout
    finally:
        server.bank.remove("fresh")


def test_bad_requests_get_clear_errors(served):
    server, _, _ = served
    long_input = " ".join(["name : The Eagle | food : French"] * 20)

    async def body(client):
        post = client.post
        return {
            "unknown": await post("/v1/generate", json={"prefix": "nope", "input": "x"}),
            "long": await post("/v1/generate", json={"input": long_input}),
            "malformed": await post("/v1/generate", content=b"{not json",
                                    headers={"content-type": "application/json"}),
            "negative": await post("/v1/generate", json={"input": "x", "max_new_tokens": -1}),
            "huge": await post("/v1/generate", json={"input": "x", "max_new_tokens": 10**9}),
            "blank": await post("/v1/generate", json={"input": "   "}),
            "extra": await post("/v1/generate", json={"input": "x", "beams": 2}),
            "sample_beam": await post("/v1/generate", json={"input": "x", "do_sample": True,
                                                            "num_beams": 2}),
            "bad_id": await post("/v1/admin/prefixes", json={"id": "../up", "path": "/tmp"},
                                 headers=ADMIN),
            "unload": await client.delete("/v1/admin/prefixes/nope", headers=ADMIN),
        }  # fmt: skip

    r = call(server, body)
    assert r["unknown"].status_code == 404 and "GET /v1/prefixes" in r["unknown"].json()["detail"]
    assert r["long"].status_code == 413 and "limit is 100" in r["long"].json()["detail"]
    assert r["malformed"].status_code == 422
    for name, bound in (("negative", "greater than or equal to 1"),
                        ("huge", "less than or equal to 32")):  # fmt: skip
        assert r[name].status_code == 422 and bound in json.dumps(r[name].json())
    for name in ("blank", "extra", "sample_beam", "bad_id"):
        assert r[name].status_code == 422, name
    assert r["unload"].status_code == 404


def test_context_limit_names_the_positions(served):
    server, _, _ = served
    prompt = list(range(50))
    with pytest.raises(Exception) as err:
        server.check_length(prompt, 6, 80)
    assert err.value.status_code == 413 and "128 positions" in err.value.detail


def test_admin_token_guards_hot_loading(served):
    server, _, _ = served  # the fixture's server has --admin-token s3cret

    async def body(client):
        denied = await client.post("/v1/admin/prefixes", json={"id": "p0", "path": "/x"})
        allowed = await client.post(
            "/v1/admin/prefixes",
            json={"id": "p0", "path": "/x"},
            headers={"Authorization": "Bearer s3cret"},
        )
        return denied, allowed

    denied, allowed = call(server, body)
    assert denied.status_code == 401
    assert allowed.status_code == 409  # past the guard: p0 exists


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_graceful_shutdown_finishes_in_flight_requests(served):
    """A real uvicorn server on 127.0.0.1: shutdown during generation still answers everyone."""
    import uvicorn

    server, _, ids = served
    server.scheduler = _fresh_scheduler(server, max_batch_size=4, max_wait_ms=0)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                       log_level="warning", timeout_graceful_shutdown=30))  # fmt: skip
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started
    url = f"http://127.0.0.1:{port}/v1/generate"
    results: list[int] = []

    def client(i: int) -> None:
        body = {"prefix": ids[i], "input": SOURCES[i], "max_new_tokens": 32}
        results.append(httpx.post(url, json=body, timeout=30).status_code)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for c in clients:
        c.start()

    def submitted() -> int:  # queued, decoding or answered: every client got through uvicorn
        stats = server.scheduler.stats()
        return stats["waiting"] + stats["running"] + stats["requests"]

    def in_flight() -> bool:
        return submitted() == len(clients) and server.scheduler.stats()["running"] > 0

    while not in_flight() and time.monotonic() < deadline:
        time.sleep(0.002)
    uv.should_exit = True
    for c in clients:
        c.join(30)
    thread.join(30)
    assert not thread.is_alive()
    assert results == [200] * 6
    assert server.scheduler.stats()["waiting"] == 0 and not server.scheduler._thread.is_alive()


# ---------------------------------------------------------------------------- CLI, bench
def test_serve_flags_map_onto_serve_config():
    import argparse

    from prefixtune.cli.args import dataclass_from_args
    from prefixtune.cli.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--prefixes", "runs/", "--port", "8001",
                              "--max-batch-size", "4", "--max-wait-ms", "2.5"])  # fmt: skip
    config = dataclass_from_args(ServeConfig, args)
    assert (config.host, config.port, config.max_batch_size, config.max_wait_ms) == (
        "127.0.0.1", 8001, 4, 2.5)  # fmt: skip
    with pytest.raises(ValueError, match="max-batch-size"):
        ServeConfig(max_batch_size=0)


def test_bench_serve_smoke(served, tmp_path):
    from prefixtune.bench.serve import bench_serve

    server, _, _ = served
    out = tmp_path / "bench.json"
    report = bench_serve(None, n_tenants=3, n_requests=9, out_json=out, max_new_tokens=4,
                         max_batch_size=4, prefix_length=2, repeats=1, model=server.model,
                         tokenizer=server.tokenizer)  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["n_requests"] == 9 and saved["continuous_batching"] is True
    assert set(saved["modes"]) == {"mixed_continuous", "mixed_dynamic", "per_prefix"}
    assert report["ratios"]["mixed_continuous_vs_per_prefix"]["throughput"] > 0
    assert report["outputs_agree_with_per_prefix"]["mixed_continuous"] == 1.0


def test_each_prefix_is_prompted_with_its_trained_separator(served, tmp_path):
    server, _, _ = served
    shapes = model_shapes(server.model)
    save_prefix(tmp_path / "tldr", random_prefix(shapes, 2), base_model="tiny",
                extra={"separator": " TL;DR: "})  # fmt: skip
    server.bank.load("tldr", tmp_path / "tldr")
    save_prefix(tmp_path / "infix", random_prefix(shapes, 2), base_model="tiny",
                extra={"method": "infix"})  # fmt: skip
    with pytest.raises(ArtifactError, match="'infix' artifact is not a prefix every position"):
        server.bank.load("infix", tmp_path / "infix")
    source = SOURCES[0]
    tldr = prompt_ids(source, server.tokenizer, separator=" TL;DR: ")
    meta = server.bank.get("tldr").meta
    assert server.prompt(source, meta) == tldr != server.prompt(source, server.bank.get("p0").meta)
    assert server.prompt(source, {}) == prompt_ids(source, server.tokenizer)

    async def body(client):
        return await client.post("/v1/generate", json={"prefix": "tldr", "input": source,
                                                       "max_new_tokens": 8})  # fmt: skip

    want = expected_texts(server.model, server.tokenizer, tmp_path, "tldr", [source])[0]
    assert call(server, body).json()["text"] == want
