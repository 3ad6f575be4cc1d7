"""One point of `prefixtune bench --suite scaling`, run inside its own worker process: a training
step (prefixtune or PEFT, with or without gradient checkpointing) or one round of multi-tenant
decoding (prefixtune's mixed batch or PEFT switching adapters), on a random Llama-family model of
the point's width and depth, on the point's device."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from prefixtune.bench import device as bench_device
from prefixtune.bench.common import SMOLLM2_CONFIG, prompt_rows, synthetic_batch

OOM_MARKS = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror")
POSITIONS = 32768  # RoPE: room for the longest input plus the longest prefix


def build_llama(arch: dict[str, Any], seed: int, device: str):
    """A frozen random Llama: SmolLM2-135M's config with `arch`'s fields over it, built on
    `device` directly (no CPU copy of a GPU model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.core.models import freeze

    config = LlamaConfig(**{**SMOLLM2_CONFIG, "max_position_embeddings": POSITIONS, **arch})
    config.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    return freeze(model)


def parameter_count(arch: dict[str, Any]) -> int:
    """Parameters of a Llama of this config (tied embeddings), without building it."""
    c = {**SMOLLM2_CONFIG, **arch}
    d, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    head = c.get("head_dim") or d // c["num_attention_heads"]
    attn = d * head * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    mlp = 3 * d * c["intermediate_size"]
    return layers * (attn + mlp + 2 * d) + vocab * d + d


def _train(spec: dict[str, Any], model, meter) -> dict[str, Any]:
    from prefixtune.bench.train import LR, _as_trainer_casts, _setup

    device = spec["device"]
    batch = synthetic_batch(model.config.vocab_size, spec["batch"], spec["seq"], seed=spec["seed"])
    batch = {key: value.to(device) for key, value in batch.items()}
    try:
        loss_fn, params = _setup(spec, model, batch)
    except ValueError as err:
        return {"refused": str(err)}
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step() -> None:
        with bench_device.autocast(spec["dtype"], device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with _as_trainer_casts(spec, model):
        result = bench_device.timed_steps(meter, step, spec["iters"], spec["warmup"],
                                          spec.get("time_cap_s", float("inf")))  # fmt: skip
    tokens = spec["batch"] * spec["seq"]
    return {**result, "tokens_per_step": tokens, "tokens_per_s": tokens / result["median_s"]}


def _tenants(spec: dict[str, Any], model, meter) -> dict[str, Any]:
    from prefixtune.bench.generate import _ours, _peft_model, random_prefix
    from prefixtune.core.attention import PrefixKV

    model.config.use_cache = model.generation_config.use_cache = True  # decode with a cache
    if spec["dtype"] == "bf16":
        model.to(torch.bfloat16)
    count, new_tokens, device = spec["tenants"], spec["new_tokens"], spec["device"]
    prefixes = [random_prefix(model, spec["prefix_len"], 1000 + i) for i in range(count)]
    rows = prompt_rows(model.config.vocab_size, count, spec["prompt_len"], spec["prompt_len"])
    pad = model.config.pad_token_id
    with tempfile.TemporaryDirectory(prefix="prefixtune-scaling-") as tmp:
        if spec["impl"] == "ours":
            mixed = PrefixKV.stack([p.kv for p in prefixes], rows=torch.arange(count))

            def step() -> None:
                _ours(model, rows, mixed, new_tokens, pad)
        else:
            peft_model = _peft_model(model, prefixes, Path(tmp), "scaling")

            def step() -> None:
                for i, row in enumerate(rows):
                    peft_model.set_adapter(f"t{i}")
                    ids = torch.tensor([row], device=device)
                    peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, num_beams=1, pad_token_id=pad)  # fmt: skip

        with torch.no_grad():
            result = bench_device.timed_steps(meter, step, spec["iters"], spec["warmup"],
                                              spec.get("time_cap_s", float("inf")))  # fmt: skip
    generated = count * new_tokens
    return {**result, "new_tokens_per_step": generated,
            "new_tokens_per_s": generated / result["median_s"]}  # fmt: skip


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one point; an out-of-memory error comes back as {"oom": message}."""
    device = spec["device"]
    enforced = "none"
    if spec.get("memory_limit_mb"):
        enforced = bench_device.limit_memory(device, spec["memory_limit_mb"])
    meter = bench_device.meter(device)
    try:
        model = build_llama(spec["arch"], spec["seed"], device)
        with bench_device.attention_kernels(device):
            run = _train if spec["task"] == "train" else _tenants
            result = run(spec, model, meter)
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, MemoryError) or any(m in str(err).lower() for m in OOM_MARKS):
            return {"oom": f"{type(err).__name__}: {str(err)[:300]}", "memory_limit": enforced}
        raise
    return {**result, "parameters": parameter_count(spec["arch"]), "memory_limit": enforced}
