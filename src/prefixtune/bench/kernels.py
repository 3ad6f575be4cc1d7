"""Kernel workers of `prefixtune bench --suite kernels`: the measurements behind two choices of
the training step, so they can be re-checked on any machine.

- attention: forward + backward of attention in fp32 or bf16 (SmolLM2's 9 query / 3 key-value
  heads of 64, a causal mask after P prefix positions, B x T = 1,024 queries) as prefixtune runs
  it (`attention.attend`: `math_attention` within its measured key limits) against PyTorch's
  SDPA kernel in the same dtype, and `math_attention` at every length (to re-check the limits);
- cross-entropy: value + gradient over 1,024 x 49,152 fp32 logits, prefixtune's chunked
  in-place loss (objective.TargetCrossEntropy) against F.cross_entropy.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from prefixtune.bench.common import autocast, measure, rates
from prefixtune.core.models import dtype_named

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
QUERIES = 1024


def run_attention(spec: dict[str, Any]) -> dict[str, Any]:
    """(B, H, T, D) queries over P + T keys in the spec's dtype (bf16: under autocast, as a
    training step runs), forward and backward."""
    from prefixtune.core.attention import attend

    length, prefix = spec["queries"], spec["prefix_len"]
    rows, keys = max(1, QUERIES // length), prefix + length
    generator = torch.Generator().manual_seed(0)
    dtype = dtype_named(spec["dtype"])

    def tensor(heads: int, positions: int) -> torch.Tensor:
        values = torch.randn(rows, heads, positions, HEAD_DIM, generator=generator)
        return values.to(dtype).requires_grad_()

    query, key, value = tensor(HEADS, length), tensor(KV_HEADS, keys), tensor(KV_HEADS, keys)
    mask = torch.ones(length, keys, dtype=torch.bool).tril(prefix)[None, None]
    mask = mask.expand(rows, 1, length, keys)  # (B, 1, T, P+T): every prefix column visible
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=False)
    kernel = {"ours": None, "sdpa": "sdpa", "math": "math"}[spec["impl"]]  # None: as training

    def step() -> None:
        with autocast(spec["dtype"]):
            out, _ = attend(module, query, key, value, mask, {}, kernel=kernel)
        out.float().sum().backward()

    result = measure(step, spec["iters"], spec["warmup"])
    return {**result, **rates(result, 1, "calls_per_s"), "rows": rows, "keys": keys}


def run_cross_entropy(spec: dict[str, Any]) -> dict[str, Any]:
    """Loss and gradient of (N, V) logits produced by a frozen matmul-like op."""
    from prefixtune.methods.objective import TargetCrossEntropy

    generator = torch.Generator().manual_seed(0)
    source = torch.randn(spec["rows"], spec["vocab"], generator=generator).requires_grad_()
    targets = torch.randint(0, spec["vocab"], (spec["rows"],), generator=generator)

    def step() -> None:
        logits = source * 1.0  # an intermediate, as the LM head's output is
        if spec["impl"] == "ours":
            loss = TargetCrossEntropy.apply(logits, targets, True)
        else:
            loss = F.cross_entropy(logits, targets)
        loss.backward()
        source.grad = None

    result = measure(step, spec["iters"], spec["warmup"])
    return {**result, **rates(result, 1, "calls_per_s")}
