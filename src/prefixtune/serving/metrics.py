"""GET /metrics: Prometheus counters and histograms of the generation routes, and gauges read
from the scheduler and the bank at scrape time (queue depth, running rows, prefixes and their
bytes, and a vLLM-style `lora_requests_info` of running/waiting prefixes for gateways)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BASE = ""  # the label value of requests without a prefix is the base model's name


def register_metrics(app: FastAPI, server: Any) -> None:
    """Add GET /metrics (Prometheus text format) to `app`."""

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body, kind = server.metrics.exposition()
        return Response(body, media_type=kind)


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, server: Any, base_name: str) -> None:
        self.registry = CollectorRegistry()
        self.base_name = base_name
        labels = ["model", "route"]
        self.requests = Counter("prefixtune_requests", "Finished generation requests",
                                [*labels, "finish_reason"], registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter("prefixtune_prompt_tokens", "Prompt tokens processed",
                                     labels, registry=self.registry)  # fmt: skip
        self.generation_tokens = Counter("prefixtune_generation_tokens", "Tokens generated",
                                         labels, registry=self.registry)  # fmt: skip
        self.latency = Histogram("prefixtune_request_latency_seconds", "Arrival to last token",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.ttft = Histogram("prefixtune_time_to_first_token_seconds",
                              "Arrival to the first generated token", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(_Gauges(server, base_name))

    def label(self, prefix: str | None) -> str:
        return self.base_name if prefix is None else prefix

    def first_token(self, prefix: str | None, route: str, arrived: float) -> None:
        self.ttft.labels(self.label(prefix), route).observe(time.monotonic() - arrived)

    def finished(self, prefix: str | None, route: str, arrived: float, prompt_tokens: int,
                 completion_tokens: int, finish_reason: str) -> None:  # fmt: skip
        """Count one answered request (all its choices)."""
        model = self.label(prefix)
        self.requests.labels(model, route, finish_reason).inc()
        self.prompt_tokens.labels(model, route).inc(prompt_tokens)
        self.generation_tokens.labels(model, route).inc(completion_tokens)
        self.latency.labels(model, route).observe(time.monotonic() - arrived)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) in Prometheus' text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Gauges:
    """Read at scrape time from the scheduler and the bank."""

    def __init__(self, server: Any, base_name: str) -> None:
        self.server, self.base_name = server, base_name

    def describe(self) -> list:
        return []  # collected lazily: the registry must not call collect() at registration

    def collect(self):
        server = self.server
        stats = server.scheduler.stats()
        running, waiting = server.scheduler.prefix_ids()
        names = [self._names(running), self._names(waiting)]
        yield _gauge("prefixtune_num_requests_waiting", "Requests in the queue", stats["waiting"])
        yield _gauge("prefixtune_num_requests_running", "Rows decoding (continuous batch and "
                     "groups)", stats["running"] + stats["group_rows"])  # fmt: skip
        yield _gauge("prefixtune_prefixes_loaded", "Prefixes in the bank", len(server.bank))
        total = server.bank.describe()["total_bytes"]
        yield _gauge("prefixtune_prefix_bytes", "Memory the loaded prefixes take", total)
        info = GaugeMetricFamily(
            "prefixtune_lora_requests_info", "Running and waiting prefixes (as vLLM's "
            "lora_requests_info; value: the time of the scrape)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )  # fmt: skip
        info.add_metric([*names, str(stats["max_batch_size"])], time.time())
        yield info

    def _names(self, prefixes: list[str | None]) -> str:
        return ",".join(sorted({self.base_name if p is None else p for p in prefixes}))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
