"""`prefixtune bench-serve --open-loop`: the live HTTP server under Poisson arrivals, through the
OpenAI API (streamed /v1/completions), at rising request rates over N prefixes.

Two servers over the same model and prefixes are compared:
    mixed       the server as shipped: rows of any prefix share the continuous batch
    per_prefix  the same server whose batch holds one prefix at a time (`OnePrefixScheduler`,
                what one-active-adapter serving allows): requests for other prefixes wait until
                the running batch has emptied
Per rate: achieved throughput (requests/s), p50/p95 latency and p50/p95 time to first token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx

from prefixtune.bench.serve import _percentile, _tenant_bank
from prefixtune.core.atomic_files import atomic_write_json
from prefixtune.core.models import load_model
from prefixtune.core.runtime import resolve_device
from prefixtune.data.builtin import builtin_examples
from prefixtune.serving.app import ServeConfig, build_server
from prefixtune.serving.lifecycle import DrainingServer
from prefixtune.serving.requests import Request
from prefixtune.serving.scheduler import Scheduler

MODES = ("mixed", "per_prefix")


class OnePrefixScheduler(Scheduler):
    """The baseline: the continuous batch holds rows of one prefix at a time; the oldest waiting
    request's prefix goes next once the batch is empty."""

    def _take(self) -> tuple[list[Request], list[Request]]:
        running = [row.tag.prefix for row in self._running.rows]
        current = running[0] if running else (self._pending[0].prefix if self._pending else None)
        others = [r for r in self._pending if r.prefix != current]
        self._pending = deque(r for r in self._pending if r.prefix == current)
        try:
            return super()._take()
        finally:  # the others wait, in arrival order
            self._pending = deque(sorted([*self._pending, *others], key=lambda r: r.arrived))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _drive(url: str, n_prefixes: int, rate: float, count: int, new: int,
                 seed: int) -> dict[str, Any]:  # fmt: skip
    """Send `count` streamed completions at Poisson arrival times (mean `rate` per second)."""
    rng = random.Random(seed)
    sources = [e.source for e in builtin_examples("train")]
    arrivals, at = [], 0.0
    for _ in range(count):
        at += rng.expovariate(rate)
        arrivals.append((at, f"t{rng.randrange(n_prefixes)}", rng.choice(sources)))
    latencies, firsts = [], []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()

        async def one(at: float, model: str, prompt: str) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent, first = time.perf_counter(), None
            body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0,
                    "stream": True}  # fmt: skip
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if first is None and line.startswith("data: "):
                        first = time.perf_counter() - sent
            latencies.append(time.perf_counter() - sent)
            firsts.append(first if first is not None else latencies[-1])

        await asyncio.gather(*(one(*arrival) for arrival in arrivals))
        wall = time.perf_counter() - start
    return {"offered_rate": rate, "requests": count, "requests_per_s": count / wall,
            "p50_ms": _percentile(latencies, 50) * 1000, "p95_ms": _percentile(latencies, 95) * 1000,
            "ttft_p50_ms": _percentile(firsts, 50) * 1000,
            "ttft_p95_ms": _percentile(firsts, 95) * 1000}  # fmt: skip


def _serve(config: ServeConfig, model: Any, tokenizer: Any, mode: str):
    """A live server in a thread (uvicorn), per_prefix with the one-prefix scheduler."""
    server = build_server(config, model, tokenizer)
    if mode == "per_prefix":
        server.scheduler = OnePrefixScheduler(
            model, server.bank, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms, max_queue=config.max_queue)  # fmt: skip
    port = _free_port()
    uv = DrainingServer(server, host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not uv.started:
        raise RuntimeError("the benchmark server did not start")
    return uv, thread, f"http://127.0.0.1:{port}"


def open_loop(model_dir_or_name: str | None = None, *, prefix_counts=(8, 32, 128),
              rates=(1.0, 2.0, 4.0), requests: int = 64, max_new_tokens: int = 32,
              max_batch_size: int = 32, prefix_length: int = 10, device: str = "auto",
              seed: int = 0, out_json: str | None = None, plot: str | None = None,
              model: Any = None, tokenizer: Any = None) -> dict[str, Any]:  # fmt: skip
    """Measure both modes at every (prefix count, rate); write JSON (and a plot) if asked."""
    if model is None:
        device = str(resolve_device(device))
        model, tokenizer = load_model(model_dir_or_name, device=device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    rows = []
    for n in prefix_counts:
        with tempfile.TemporaryDirectory() as root:
            _tenant_bank(model, tokenizer, n, prefix_length, Path(root))
            config = ServeConfig(prefixes=root, max_batch_size=max_batch_size, max_wait_ms=5,
                                 max_queue=100_000, max_new_tokens_limit=max_new_tokens)  # fmt: skip
            for mode in MODES:
                uv, thread, url = _serve(config, model, tokenizer, mode)
                try:
                    for rate in rates:
                        result = asyncio.run(_drive(url, n, rate, requests, max_new_tokens, seed))
                        rows.append({"prefixes": n, "mode": mode, **result})
                finally:
                    uv.should_exit = True
                    thread.join(60)
    report = {"rows": rows, "requests": requests, "max_new_tokens": max_new_tokens,
              "max_batch_size": max_batch_size, "model": model_dir_or_name or "smollm2"}  # fmt: skip
    if out_json:
        atomic_write_json(out_json, report)
    if plot:
        plot_latency_vs_throughput(rows, plot)
    return report


def plot_latency_vs_throughput(rows: list[dict[str, Any]], path: str) -> None:
    """p95 latency against achieved throughput, one line per (prefixes, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r["prefixes"], r["mode"]) for r in rows):
        mine = [r for r in rows if (r["prefixes"], r["mode"]) == key]
        ax.plot([r["requests_per_s"] for r in mine], [r["p95_ms"] for r in mine], marker="o",
                linestyle="-" if key[1] == "mixed" else "--", label=f"{key[0]} prefixes, {key[1]}")  # fmt: skip
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p95 latency (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
