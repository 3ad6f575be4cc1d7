"""Useful FLOPs of a prefix-tuning step, and this CPU's measured matmul peak (for MFU).

Counted (multiply-add = 2 FLOPs), per real token, never for padding:
- forward: every linear layer of every block, attention scores and weighted values over the
  keys a query may see (the prefix plus the causal past: P + i + 1 keys for the i-th token),
  and the LM head at target positions only;
- backward, activation gradients only (the base model is frozen): the linear layers once more
  (grad of the input), attention twice (grads of both operands of QK^T and of AV), the LM head
  once at target positions; weight gradients only for full fine-tuning (`weight_grads`);
- the prefix MLP once per step (forward + backward = 3x its forward), however often an
  implementation actually runs it.
Not counted: norms, softmax, activations, embeddings lookups, the optimizer. The layer-0 input
gradient, which prefix-tuning does not need, is counted (about 1/L of the backward linears).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from prefixtune.core.models import text_config

_NON_GATED = ("gpt2", "gpt_neo", "gptj", "gpt_bigcode")


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool
    vocab: int

    def linear_per_token(self) -> int:
        """Forward FLOPs of all blocks' linear layers for one token."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = (3 if self.gated else 2) * self.hidden * self.ffn
        return 2 * self.layers * (q_o + k_v + mlp)

    def attention_row(self, tokens: int, prefix: int) -> int:
        """Forward attention FLOPs of one row of `tokens` real tokens after `prefix` positions."""
        keys = prefix * tokens + tokens * (tokens + 1) // 2  # sum over i of (P + i + 1)
        return 4 * self.layers * self.heads * self.head_dim * keys

    def head_per_target(self) -> int:
        return 2 * self.hidden * self.vocab


def geometry(config) -> Geometry:
    """Read the block geometry off a decoder-only config (GPT-2 style or Llama-style gated MLP)."""
    config = text_config(config)
    if config.model_type in _NON_GATED:
        hidden, heads = config.n_embd, config.n_head
        ffn = getattr(config, "n_inner", None) or 4 * hidden
        return Geometry(config.n_layer, hidden, heads, heads, hidden // heads, ffn, False,
                        config.vocab_size)  # fmt: skip
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if not hasattr(config, "intermediate_size"):
        raise ValueError(f"cannot count FLOPs for model type {config.model_type!r}")
    return Geometry(config.num_hidden_layers, hidden, heads, kv_heads, head_dim,
                    config.intermediate_size, True, config.vocab_size)  # fmt: skip


def mlp_flops(prefix: int, embed: int, hidden: int, width: int) -> int:
    """Forward FLOPs of the reparameterisation MLP over the P prefix rows (computed once)."""
    return 2 * prefix * (embed * hidden + hidden * width)


def train_step_flops(
    geo: Geometry,
    lengths: list[int],
    targets: int,
    prefix: int = 0,
    *,
    mlp: tuple[int, int, int] | None = None,
    weight_grads: bool = False,
) -> dict[str, int]:
    """Useful FLOPs of one training step over rows of `lengths` real tokens with `targets`
    target tokens in all; `mlp` = (embed, hidden, width) when the prefix is reparameterised."""
    tokens = sum(lengths)
    linear = tokens * geo.linear_per_token()
    attention = sum(geo.attention_row(n, prefix) for n in lengths)
    head = targets * geo.head_per_target()
    forward = linear + attention + head
    backward = linear + 2 * attention + head
    if weight_grads:
        backward += linear + head
    prefix_mlp = 3 * mlp_flops(prefix, *mlp) if mlp else 0
    return {
        "forward": forward,
        "backward": backward,
        "prefix_mlp": prefix_mlp,
        "linear_forward": linear,
        "attention_forward": attention,
        "head_forward": head,
        "total": forward + backward + prefix_mlp,
    }


# (rows, inner, cols): squares, and the linear layers of a 1,024-token batch through GPT-2-small
# (768 -> 3072 -> 768) and SmolLM2 (576 -> 1536 -> 576), whose shapes a training step runs.
PEAK_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (1024, 768, 3072),
               (1024, 3072, 768), (1024, 576, 1536), (1024, 1536, 576))  # fmt: skip


# On a GPU the small shapes leave the tensor cores idle between launches: the large ones set the peak.
CUDA_PEAK_SHAPES = (*PEAK_SHAPES, (4096, 4096, 4096), (8192, 8192, 8192))


def matmul_peak(
    dtype: torch.dtype, shapes=PEAK_SHAPES, seconds: float = 1.0, rounds: int = 3,
    device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Best matmul throughput (GFLOP/s) of this CPU (or of the CUDA device, with `device`
    "cuda": CUDA_PEAK_SHAPES unless given, timed with CUDA events) in `dtype`.

    Every shape runs `rounds` times, about `seconds` each, interleaved; the best round counts, so
    a busy moment on a shared machine lowers no shape's figure. A shape whose single call takes
    over 2 s (emulated bf16 on CPUs without native support) is dropped.
    """
    by_shape: dict[str, float] = {}
    too_slow: set[str] = set()
    if device == "cuda" and shapes is PEAK_SHAPES:
        shapes = CUDA_PEAK_SHAPES
    for _ in range(rounds):
        for m, k, n in shapes:
            name = f"{m}x{k}x{n}"
            if device == "cuda":
                rate = _cuda_matmul_rate(dtype, m, k, n, seconds)
            else:
                rate = None if name in too_slow else _matmul_rate(dtype, m, k, n, seconds)
            if rate is None:
                too_slow.add(name)
                continue
            by_shape[name] = max(rate, by_shape.get(name, 0.0))
    return {"gflops": max(by_shape.values()), "by_shape": by_shape,
            "threads": torch.get_num_threads()}  # fmt: skip


def _cuda_matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float) -> float:
    """GFLOP/s of (m, k) @ (k, n) on the CUDA device, over at least `seconds`."""
    a = torch.randn(m, k, device="cuda").to(dtype)
    b = torch.randn(k, n, device="cuda").to(dtype)
    return event_rate(lambda: torch.mm(a, b), 2 * m * k * n, seconds, torch.cuda)


def event_rate(call, flops: int, seconds: float, cuda: Any) -> float:
    """GFLOP/s of `call` (`flops` each) timed with CUDA events: one untimed call, then batches
    of 1, 2, 4, ... calls between synchronizes until a batch takes `seconds` (launches queue up
    inside a batch, so the GPU never waits on Python). `cuda` is torch.cuda or a stand-in."""
    call()
    calls = 1
    while True:
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        cuda.synchronize()
        start.record()
        for _ in range(calls):
            call()
        end.record()
        cuda.synchronize()
        elapsed = start.elapsed_time(end) / 1000.0  # ms -> s
        if elapsed >= seconds:
            return flops * calls / elapsed / 1e9
        calls *= 2


def _matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float) -> float | None:
    """GFLOP/s of (m, k) @ (k, n) over about `seconds`; None when one call takes over 2 s."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    began = time.perf_counter()
    torch.mm(a, b)
    first = time.perf_counter() - began
    if first > 2.0:
        return None
    calls, began = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        calls += 1
        elapsed = time.perf_counter() - began
        if elapsed >= seconds or (calls >= 2 and elapsed + first > 2 * seconds):
            return 2 * m * k * n * calls / elapsed / 1e9
