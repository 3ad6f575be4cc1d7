"""The OpenAI-compatible API against a live server on 127.0.0.1, driven by the real `openai`
client (sync and async, plain and streamed, completions and chat): every answer equals the same
request decoded directly with generate(); stop strings, n > 1, logprobs, a disconnect, /metrics
parsed by prometheus_client, and the error cases in OpenAI's schema. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import math

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_serve_hostile import _slow_steps, _Uvicorn, _wait_until

from prefixtune.config import GenerateConfig
from prefixtune.core.artifact import load_prefix
from prefixtune.data.encoding import prompt_ids
from prefixtune.generation.engine import generate
from prefixtune.serving.token_text import token_text

import test_serve
from test_serve import SOURCES, _fresh_scheduler

served = test_serve.served  # a tiny GPT-2 server with 8 prefixes p0..p7

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip
NEW = 12


@pytest.fixture(scope="module")
def live(served):
    """The served tiny GPT-2 behind uvicorn in a thread, with a chat template set."""
    server, root, ids = served
    server.tokenizer.chat_template = CHAT_TEMPLATE
    server.scheduler = _fresh_scheduler(server, max_wait_ms=20)
    uv = _Uvicorn(server)
    yield server, root, ids, uv.url
    uv.uv.should_exit = True
    uv.thread.join(30)


def client(url: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60,
                         **options)  # fmt: skip


def reference(server, root, prefix, ids, config=None) -> str:
    """The text generate() gives for these prompt ids with this prefix, alone."""
    config = config or GenerateConfig(max_new_tokens=NEW)
    tokens = torch.tensor([ids])
    kv = None if prefix is None else load_prefix(root / prefix).to_prefix_kv()
    out = generate(server.model, tokens, torch.ones_like(tokens), kv, config,
                   eos_token_id=server.tokenizer.eos_token_id,
                   pad_token_id=server.tokenizer.pad_token_id)[0]  # fmt: skip
    return server.tokenizer.decode(out, skip_special_tokens=True)


def source_ids(server, text: str) -> list[int]:
    return prompt_ids(text, server.tokenizer)  # the test prefixes were saved without a separator


def chat_ids(server, messages) -> list[int]:
    """The template rendered by hand, tokenised without special tokens."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return server.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- models
def test_models_lists_the_base_and_every_prefix(live):
    server, _, ids, url = live
    models = client(url).models.list().data
    names = [m.id for m in models]
    assert names[0] == server.base_name() and set(ids) <= set(names[1:])
    entry = next(m for m in models if m.id == "p2")
    assert entry.length == 5 and entry.bytes == server.bank.get("p2").num_bytes()
    assert entry.parent == server.base_name()


# ---------------------------------------------------------------------------- completions
def test_completions_equal_generate_for_a_prefix_and_the_base(live):
    server, root, _, url = live
    api = client(url)
    for model, prefix in (("p1", "p1"), (server.base_name(), None)):
        reply = api.completions.create(model=model, prompt=SOURCES[0], max_tokens=NEW,
                                       temperature=0)  # fmt: skip
        want = reference(server, root, prefix, source_ids(server, SOURCES[0]))
        assert reply.choices[0].text == want
        assert reply.usage.prompt_tokens == len(source_ids(server, SOURCES[0]))
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_list_prompts_over_four_prefixes_share_one_batch_async(live):
    """4 concurrent requests (4 prefixes) x 2 prompts = 8 rows: one mixed batch, each row equal
    to its own generate() run."""
    server, root, ids, url = live
    old = server.scheduler
    server.scheduler = _fresh_scheduler(server, max_batch_size=8, max_wait_ms=5000).start()
    try:

        async def run():
            api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
            return await asyncio.gather(*(
                api.completions.create(model=ids[i], prompt=SOURCES[2 * i : 2 * i + 2],
                                       max_tokens=NEW, temperature=0)
                for i in range(4)))  # fmt: skip

        replies = asyncio.run(run())
        assert server.scheduler.counters["batches"] == 1  # one prefill: the 8 rows together
    finally:
        server.scheduler.close(10)
        server.scheduler = old
    for i, reply in enumerate(replies):
        for j, choice in enumerate(reply.choices):
            want = reference(server, root, ids[i], source_ids(server, SOURCES[2 * i + j]))
            assert choice.index == j and choice.text == want


def test_streamed_completions_equal_the_whole_reply(live):
    server, root, _, url = live
    api = client(url)
    texts = {0: "", 1: ""}
    reasons = {}
    for chunk in api.completions.create(model="p3", prompt=SOURCES[1], max_tokens=NEW,
                                        temperature=0, n=2, stream=True):  # fmt: skip
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    want = reference(server, root, "p3", source_ids(server, SOURCES[1]))
    assert texts == {0: want, 1: want} and set(reasons) == {0, 1}


def test_stop_strings_end_the_text_before_them(live):
    server, root, _, url = live
    candidates = ((p, x) for p in ("p4", "p5", "p6", None) for x in SOURCES)
    for prefix, source in candidates:  # a case whose text has a non-blank middle
        full = reference(server, root, prefix, source_ids(server, source))
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        if len(full) >= 4 and stop.strip():
            break
    want = full[: full.find(stop)]
    model = prefix or server.base_name()
    api = client(url)
    reply = api.completions.create(model=model, prompt=source, max_tokens=NEW,
                                   temperature=0, stop=[stop, "\x00never"])  # fmt: skip
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=model, prompt=source, max_tokens=NEW, temperature=0, stop=stop, stream=True))  # fmt: skip
    assert streamed == want


def test_sampling_with_n_choices_uses_seed_plus_index(live):
    server, root, _, url = live
    reply = client(url).completions.create(model="p5", prompt=SOURCES[4], max_tokens=NEW,
                                           temperature=0.9, top_p=0.95, n=2, seed=7)  # fmt: skip
    ids = source_ids(server, SOURCES[4])
    for i, choice in enumerate(reply.choices):
        config = GenerateConfig(max_new_tokens=NEW, do_sample=True, temperature=0.9, top_p=0.95,
                                seed=7 + i)  # fmt: skip
        assert choice.text == reference(server, root, "p5", ids, config)


def test_logprobs_are_the_models_log_softmax(live):
    server, root, _, url = live
    reply = client(url).completions.create(model="p0", prompt=SOURCES[5], max_tokens=4,
                                           temperature=0, logprobs=3)  # fmt: skip
    lp = reply.choices[0].logprobs
    ids = source_ids(server, SOURCES[5])
    kv = load_prefix(root / "p0").to_prefix_kv()
    config = GenerateConfig(max_new_tokens=4)
    tokens = generate(server.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                      kv, config, eos_token_id=server.tokenizer.eos_token_id,
                      pad_token_id=server.tokenizer.pad_token_id)[0]  # fmt: skip
    assert len(lp.token_logprobs) == len(tokens)
    for k, token in enumerate(tokens):  # greedy: the chosen token is the most likely one
        assert lp.tokens[k] == token_text(server.tokenizer, token)
        assert math.isclose(max(lp.top_logprobs[k].values()), lp.token_logprobs[k], abs_tol=1e-5), (
            lp,
            tokens,
        )
        assert len(lp.top_logprobs[k]) <= 3 and lp.token_logprobs[k] <= 0
    assert lp.text_offset[0] == 0


# ---------------------------------------------------------------------------- chat
def test_chat_plain_and_streamed_equal_generate(live):
    server, root, _, url = live
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": SOURCES[6]}]  # fmt: skip
    want = reference(server, root, "p6", chat_ids(server, messages))
    api = client(url)
    reply = api.chat.completions.create(model="p6", messages=messages, max_tokens=NEW,
                                        temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(chat_ids(server, messages))
    chunks = list(api.chat.completions.create(model="p6", messages=messages, max_tokens=NEW,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_chat_async_streaming(live):
    server, root, _, url = live
    messages = [{"role": "user", "content": SOURCES[7]}]

    async def run():
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        text = ""
        async for chunk in await api.chat.completions.create(
                model=server.base_name(), messages=messages, max_tokens=NEW, temperature=0,
                stream=True):  # fmt: skip
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        return text

    assert asyncio.run(run()) == reference(server, root, None, chat_ids(server, messages))


# ---------------------------------------------------------------------------- disconnects
# Each decode step takes at least this long, so 32 tokens take 8 s: a row that finishes on its
# own (disconnect missed) and one cancelled early cannot be confused, even on a loaded CI box.
STEP_SECONDS = 0.25


def test_a_streaming_client_that_disconnects_leaves_the_batch(live):
    server, _, _, url = live
    old = server.scheduler
    server.scheduler = _fresh_scheduler(server, max_wait_ms=0, eos_token_id=-1).start()
    _slow_steps(server.scheduler, STEP_SECONDS)
    try:
        body = {"model": "p0", "prompt": SOURCES[0], "max_tokens": 32, "temperature": 0,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.scheduler.stats()["running"] == 1
        # the connection is closed: the row leaves long before its 32 slow steps are done
        assert _wait_until(lambda: server.scheduler.stats()["running"] == 0, timeout=10)
        assert server.scheduler.counters["cancelled"] == 1
        assert server.scheduler.counters["requests"] == 0
    finally:
        server.scheduler.close(10)
        server.scheduler = old


def test_a_plain_client_that_disconnects_leaves_the_batch(live):
    server, _, _, url = live
    old = server.scheduler
    server.scheduler = _fresh_scheduler(server, max_wait_ms=0, eos_token_id=-1).start()
    _slow_steps(server.scheduler, STEP_SECONDS)
    try:
        body = {"model": "p0", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 32, "temperature": 0}  # fmt: skip
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.4)
        assert _wait_until(lambda: server.scheduler.counters["cancelled"] == 1, timeout=10)
        assert server.scheduler.stats()["running"] == 0
    finally:
        server.scheduler.close(10)
        server.scheduler = old


# ---------------------------------------------------------------------------- metrics
def _metrics(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_count_requests_tokens_and_prefixes(live):
    server, _, ids, url = live
    key = "[('model', 'p7'), ('route', 'completions')]"
    before = _metrics(url)
    reply = client(url).completions.create(model="p7", prompt=SOURCES[2], max_tokens=NEW,
                                           temperature=0, n=2)  # fmt: skip
    after = _metrics(url)
    tokens = reply.usage.completion_tokens
    assert (
        after["prefixtune_generation_tokens_total" + key]
        - before.get("prefixtune_generation_tokens_total" + key, 0)
        == tokens
    )
    assert after["prefixtune_prompt_tokens_total" + key] >= reply.usage.prompt_tokens
    ttft = "prefixtune_time_to_first_token_seconds_count" + key
    assert after[ttft] - before.get(ttft, 0) == 1
    assert after["prefixtune_request_latency_seconds_count" + key] >= 1
    assert after["prefixtune_prefixes_loaded[]"] == len(server.bank)
    assert after["prefixtune_prefix_bytes[]"] == server.bank.describe()["total_bytes"]
    assert after["prefixtune_num_requests_running[]"] == 0


def test_metrics_name_the_running_prefixes(live):
    server, _, _, url = live
    old = server.scheduler
    server.scheduler = _fresh_scheduler(server, max_wait_ms=0, eos_token_id=-1).start()
    _slow_steps(server.scheduler, 0.05)
    try:
        body = {"model": "p3", "prompt": SOURCES[0], "max_tokens": 32, "temperature": 0,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            text = httpx.get(f"{url}/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        info = families["prefixtune_lora_requests_info"].samples[0].labels
        assert info["running_lora_adapters"] == "p3" and info["waiting_lora_adapters"] == ""
        assert families["prefixtune_num_requests_running"].samples[0].value == 1
    finally:
        server.scheduler.close(10)
        server.scheduler = old


# ---------------------------------------------------------------------------- the native route
def test_native_generate_still_answers(live):
    server, root, _, url = live
    reply = httpx.post(f"{url}/v1/generate", json={"prefix": "p1", "input": SOURCES[0],
                                                   "max_new_tokens": NEW}, timeout=30)  # fmt: skip
    want = reference(server, root, "p1", source_ids(server, SOURCES[0]))
    assert reply.status_code == 200 and reply.json()["text"] == want.strip()


def test_beam_search_extension_equals_generate_plain_and_streamed(live):
    server, root, _, url = live
    config = GenerateConfig(max_new_tokens=NEW, num_beams=3)
    want = reference(server, root, "p2", source_ids(server, SOURCES[5]), config)
    api = client(url)
    options = dict(model="p2", prompt=SOURCES[5], max_tokens=NEW, extra_body={"num_beams": 3})
    assert api.completions.create(**options).choices[0].text == want
    chunks = api.completions.create(**options, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want


def test_echo_starts_the_text_with_the_prompt(live):
    server, root, _, url = live
    reply = client(url).completions.create(model="p1", prompt=SOURCES[0], max_tokens=NEW,
                                           temperature=0, echo=True)  # fmt: skip
    want = reference(server, root, "p1", source_ids(server, SOURCES[0]))
    assert reply.choices[0].text == SOURCES[0] + want


def test_chat_logprobs_name_each_token(live):
    server, _, _, url = live
    reply = client(url).chat.completions.create(
        model="p0", messages=[{"role": "user", "content": SOURCES[1]}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5  # greedy: the top one
        assert entry.bytes and entry.logprob <= 0
