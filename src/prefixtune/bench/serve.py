"""`prefixtune bench serve`: serving many tenants (prefixes) from one model, mixed batches vs
one prefix at a time, measured side by side in one process.

Modes (the same requests, all arriving at once, greedy decoding; engine level, no HTTP):
    mixed_continuous  the server's scheduler: rows of any prefix join the running batch between
                      decode steps (continuous batching; decoder-only models with a seedable cache)
    mixed_dynamic     the scheduler with request-level batching: mixed-prefix batches via generate()
    per_prefix        sequential per-prefix batches through generate() (what PEFT allows with
                      prefix adapters: one active adapter per forward)
Modes run interleaved, `repeats` times; the report holds medians and the ratios to per_prefix.
"""

from __future__ import annotations

import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from prefixtune.config import GenerateConfig
from prefixtune.core.artifact import save_prefix
from prefixtune.core.atomic_files import atomic_write_json
from prefixtune.core.models import load_model, public_model_id
from prefixtune.core.prefix_encoder import capture_kv, word_ids
from prefixtune.core.runtime import resolve_device
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import prompt_ids
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import pad_prompts
from prefixtune.serving.bank import PrefixBank
from prefixtune.serving.scheduler import Scheduler

MODES = ("mixed_continuous", "mixed_dynamic", "per_prefix")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _tenant_bank(model, tokenizer, n_tenants: int, prefix_length: int, root: Path) -> PrefixBank:
    """n_tenants real-word prefixes (different words each) saved and loaded like a server's."""
    for tenant in range(n_tenants):
        text = f"tenant {tenant}: describe restaurant number {tenant * 7 + 3} in one sentence."
        kv = capture_kv(model, word_ids(tokenizer, text, prefix_length))
        save_prefix(root / f"t{tenant}", kv, base_model="bench")
    bank = PrefixBank(model)
    failed = bank.load_dir(root)
    if failed:
        raise RuntimeError(f"bench prefixes failed to load: {failed}")
    return bank


def _workload(tokenizer, n_requests: int, n_tenants: int, seed: int) -> list[tuple[list[int], str]]:
    """(prompt ids, tenant id) per request: built-in sources, tenants in shuffled order."""
    sources = [e.source for e in builtin_examples("train")]
    tenants = [f"t{i % n_tenants}" for i in range(n_requests)]
    random.Random(seed).shuffle(tenants)
    return [(prompt_ids(sources[i % len(sources)], tokenizer), tenants[i])
            for i in range(n_requests)]  # fmt: skip


def _run_scheduler(scheduler: Scheduler, work, config: GenerateConfig) -> dict[str, Any]:
    start = time.perf_counter()
    futures = [scheduler.submit(prompt, tenant, config) for prompt, tenant in work]
    results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies": [r.total_s for r in results],
            "outputs": [r.tokens for r in results]}  # fmt: skip


def _run_per_prefix(model, bank, work, config, batch: int, eos: int, pad: int) -> dict[str, Any]:
    """Each tenant's requests in batches of `batch` with that one prefix, tenant after tenant."""
    start = time.perf_counter()
    latencies, outputs = [0.0] * len(work), [[] for _ in work]
    for tenant in dict.fromkeys(t for _, t in work):
        mine = [i for i, (_, t) in enumerate(work) if t == tenant]
        for chunk in (mine[i : i + batch] for i in range(0, len(mine), batch)):
            ids, mask = pad_prompts(model, [work[i][0] for i in chunk], pad)
            prefix = bank.gather([tenant] * len(chunk))
            tokens = generate(model, ids, mask, prefix, config, eos_token_id=eos, pad_token_id=pad)
            done = time.perf_counter() - start
            for i, row in zip(chunk, tokens, strict=True):
                latencies[i], outputs[i] = done, row
    return {"wall_s": time.perf_counter() - start, "latencies": latencies, "outputs": outputs}


def _summary(runs: list[dict[str, Any]], n: int) -> dict[str, float]:
    rps = [n / r["wall_s"] for r in runs]
    tokens = sum(len(o) for o in runs[0]["outputs"])
    return {
        "requests_per_s": statistics.median(rps),
        "tokens_per_s": statistics.median(tokens / r["wall_s"] for r in runs),
        "p50_ms": statistics.median(_percentile(r["latencies"], 50) * 1000 for r in runs),
        "p95_ms": statistics.median(_percentile(r["latencies"], 95) * 1000 for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "completion_tokens": tokens,
    }


def bench_serve(
    model_dir_or_name: str | None = None,
    n_tenants: int = 8,
    n_requests: int = 128,
    out_json: str | Path | None = None,
    *,
    max_new_tokens: int = 32,
    max_batch_size: int = 16,
    prefix_length: int = 10,
    repeats: int = 3,
    device: str = "auto",
    seed: int = 0,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Requests/s and p50/p95 latency of mixed-prefix serving vs one prefix at a time.

    `model`/`tokenizer` may be passed instead of a name (tests). Writes `out_json` if given.
    """
    if model is None:
        model, tokenizer = load_model(model_dir_or_name, device=str(resolve_device(device)))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GenerateConfig(max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        bank = _tenant_bank(model, tokenizer, n_tenants, prefix_length, Path(tmp))
    work = _workload(tokenizer, n_requests, n_tenants, seed)
    schedulers = {
        mode: Scheduler(model, bank, eos_token_id=eos, pad_token_id=pad,
                        max_batch_size=max_batch_size, max_wait_ms=5.0,
                        max_queue=max(1024, n_requests),
                        continuous=None if mode == "mixed_continuous" else False).start()
        for mode in MODES[:2]
    }  # fmt: skip
    continuous = schedulers["mixed_continuous"].continuous

    def once(mode: str, jobs) -> dict[str, Any]:
        if mode == "per_prefix":
            return _run_per_prefix(model, bank, jobs, config, max_batch_size, eos, pad)
        return _run_scheduler(schedulers[mode], jobs, config)

    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:  # warm-up
            once(mode, work[: min(len(work), max_batch_size)])
        for _ in range(max(1, repeats)):
            for mode in MODES:
                runs[mode].append(once(mode, work))
    finally:
        for scheduler in schedulers.values():
            scheduler.close()
    modes = {mode: _summary(runs[mode], len(work)) for mode in MODES}
    base = modes["per_prefix"]
    ratios = {
        f"{mode}_vs_per_prefix": {
            "throughput": modes[mode]["requests_per_s"] / base["requests_per_s"],
            "p50_latency": modes[mode]["p50_ms"] / base["p50_ms"],
            "p95_latency": modes[mode]["p95_ms"] / base["p95_ms"],
        }
        for mode in MODES[:2]
    }
    reference = runs["per_prefix"][0]["outputs"]
    agree = {mode: sum(a == b for a, b in zip(runs[mode][0]["outputs"], reference, strict=True))
             / len(reference) for mode in MODES[:2]}  # fmt: skip
    report = {
        "model": public_model_id(model),
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "n_tenants": n_tenants,
        "n_requests": len(work),
        "max_new_tokens": max_new_tokens,
        "max_batch_size": max_batch_size,
        "prefix_length": prefix_length,
        "repeats": max(1, repeats),
        "arrival": "burst (all requests at t=0)",
        "continuous_batching": continuous,
        "modes": modes,
        "ratios": ratios,
        "outputs_agree_with_per_prefix": agree,
    }
    if out_json:
        atomic_write_json(Path(out_json), report)
    return report
