"""Decoding workers of `prefixtune bench`: batched greedy generation with one prefix, and the
multi-tenant case (every request its own prefix). PEFT gets the very same prefixes through
`prefixtune export` (interop.export_peft) and `PeftModel.from_pretrained` / `load_adapter`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from prefixtune.bench import device as bench_device
from prefixtune.bench.common import build_model, prompt_rows, rates
from prefixtune.core.artifact import FoldedPrefix
from prefixtune.core.fuse import fuse_projections

NEVER = -1  # an EOS id no model emits: every row decodes exactly new_tokens tokens


def random_prefix(model, length: int, seed: int) -> FoldedPrefix:
    """A folded prefix of PEFT's geometry with random keys/values (seeded; no model change)."""
    from prefixtune.interop.peft import peft_shape

    shape = peft_shape(model.config)
    generator = torch.Generator().manual_seed(seed)
    size = (shape.layers, 2, shape.heads, length, shape.head_dim)
    return FoldedPrefix({"self": torch.randn(size, generator=generator)}, {"base_model": "bench"})


def _setup(spec: dict[str, Any]):
    model, _ = build_model(spec["model"], seed=spec.get("seed", 0),
                           device=spec.get("device", "cpu"))  # fmt: skip
    model.config.use_cache = True
    if spec["dtype"] == "bf16":
        model.to(torch.bfloat16)
    count = spec["prompts"]
    prefixes = [random_prefix(model, spec["prefix_len"], 1000 + i) for i in range(count)]
    rows = prompt_rows(model.config.vocab_size, count, spec["prompt_min"], spec["prompt_max"])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model, prefixes, rows, pad


def _ours(model, rows, prefix_kv, new_tokens: int, pad: int, compile: bool = False,
          fuse: bool = False):  # fmt: skip
    from prefixtune.config import GenerateConfig
    from prefixtune.generation.engine import generate
    from prefixtune.generation.prefill import left_pad

    ids, mask = left_pad(rows, pad)
    config = GenerateConfig(max_new_tokens=new_tokens, compile=compile, fuse_projections=fuse)
    return generate(model, ids, mask, prefix_kv, config, eos_token_id=NEVER, pad_token_id=pad)


def _peft_generate(peft_model, rows, new_tokens: int, pad: int) -> list[list[int]]:
    from prefixtune.generation.prefill import left_pad

    ids, mask = left_pad(rows, pad)
    device = next(peft_model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)  # the CPU: the same tensors
    out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad)  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def _peft_model(model, prefixes: list[FoldedPrefix], directory: Path, name: str):
    """A PeftModel holding every prefix as an adapter t0, t1, ... exported by prefixtune."""
    from peft import PeftModel

    from prefixtune.interop.peft import export_peft

    paths = []
    for i, prefix in enumerate(prefixes):
        paths.append(export_peft(prefix, directory / f"t{i}", base_model_name_or_path=name,
                                 model_config=model.config))  # fmt: skip
    model.generation_config.eos_token_id = None  # decode exactly new_tokens, as ours does
    peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name="t0")
    for i, path in enumerate(paths[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"t{i}")
    return peft_model.eval()


def _measure(spec: dict[str, Any], step) -> dict[str, Any]:
    """Time `step` on the spec's device (bench/device.py: SDPA flash/efficient on CUDA)."""
    device = spec.get("device", "cpu")
    with bench_device.attention_kernels(device):
        return bench_device.measure(device, step, spec["iters"], spec["warmup"])


def _result(result: dict[str, Any], outputs: list[list[int]], generated: int) -> dict[str, Any]:
    return {
        **result,
        **rates(result, generated, "new_tokens_per_s"),
        "new_tokens_total": generated,
        "outputs": outputs,
    }


def run_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """One batch of prompts, one shared prefix, greedy decoding of new_tokens tokens."""
    model, prefixes, rows, pad = _setup(spec)
    new_tokens, outputs = spec["new_tokens"], {}
    compile = spec.get("compile", False)  # a compiled config compiles in its warm-up
    with tempfile.TemporaryDirectory(prefix="prefixtune-bench-") as tmp:
        if spec["impl"] == "ours":
            prefix_kv = prefixes[0].to_prefix_kv()
            if spec.get("fuse", False):  # fused once, outside the timed steps (generate() would
                fuse_projections(model)  # fuse and unfuse around each call otherwise)

            def step() -> None:
                outputs["rows"] = _ours(model, rows, prefix_kv, new_tokens, pad, compile,
                                        spec.get("fuse", False))  # fmt: skip
        else:
            peft_model = _peft_model(model, prefixes[:1], Path(tmp), spec["model"])

            def step() -> None:
                outputs["rows"] = _peft_generate(peft_model, rows, new_tokens, pad)

        result = _measure(spec, step)
    return _result(result, outputs["rows"], len(rows) * new_tokens)


def run_multitenant(spec: dict[str, Any]) -> dict[str, Any]:
    """N requests, N different prefixes: prefixtune decodes them as one mixed batch, PEFT
    switches adapters and decodes the requests one by one."""
    from prefixtune.core.attention import PrefixKV

    model, prefixes, rows, pad = _setup(spec)
    new_tokens, outputs = spec["new_tokens"], {}
    compile = spec.get("compile", False)  # a compiled config compiles in its warm-up
    with tempfile.TemporaryDirectory(prefix="prefixtune-bench-") as tmp:
        if spec["impl"] == "ours":
            mixed = PrefixKV.stack([p.kv for p in prefixes], rows=torch.arange(len(rows)))

            def step() -> None:
                outputs["rows"] = _ours(model, rows, mixed, new_tokens, pad, compile)
        else:
            peft_model = _peft_model(model, prefixes, Path(tmp), spec["model"])

            def step() -> None:
                done = []
                for i, row in enumerate(rows):
                    peft_model.set_adapter(f"t{i}")
                    done += _peft_generate(peft_model, [row], new_tokens, pad)
                outputs["rows"] = done

        result = _measure(spec, step)
    return _result(result, outputs["rows"], len(rows) * new_tokens)
