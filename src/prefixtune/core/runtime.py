"""Runtime choices around a loaded model: the device ('auto'), the autocast dtype the hardware
supports and its context, gradient checkpointing, and torch.compile for training and decoding."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.config import ConfigError
from prefixtune.core.models import ModelLoadError


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls are native: CUDA with bf16, or CPUs with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AMX"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str | torch.device) -> torch.device:
    """The device a --device flag names: 'auto' is CUDA where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(
    dtype: torch.dtype | None, device: str | torch.device
) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`'s type; None: a no-op context (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def autocast_dtype(requested: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """Training/inference autocast dtype: 'auto' follows the hardware (bf16 only where native)."""
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if requested in ("float32", "none", "fp32"):
        return None
    if requested in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise ModelLoadError(f"autocast must be auto, float32 or bfloat16, got {requested!r}")


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute layer activations in backward, keeping dropout off.

    transformers checkpoints a layer only while `layer.training` is set, so that flag is set on
    the checkpointing layers alone (not recursively): their dropout modules stay in eval mode.
    Layers that apply functional dropout with their own flag (BART's `F.dropout(p=self.dropout,
    training=self.training)`) get those probabilities set to 0.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True
            for name, value in vars(module).items():
                if "dropout" in name and isinstance(value, float):
                    setattr(module, name, 0.0)


def compiled(loss_fn: Callable[..., Tensor], device: torch.device) -> Callable[..., Tensor]:
    """`loss_fn` under torch.compile (inductor). Shapes are specialised on the first call and
    made dynamic after the first change, so length-bucketed batches compile two or three times.
    """
    _require_compiler(device)
    return torch.compile(loss_fn, dynamic=None)


def compiled_for_decoding(model: PreTrainedModel) -> torch.nn.Module:
    """`model` under torch.compile for generation, with dynamic shapes from the first call.

    The key length grows by one every step and finished rows leave the batch, so decoding
    compiles once per kind of call (prompt prefill, one-token step, a batch of one row: sizes 0
    and 1 are always specialised), not once per step. Calls and attributes reach the model
    (`_orig_mod`); dynamo keeps the compiled code for later calls on the same model, up to its
    recompile limit per function (`torch._dynamo.config.recompile_limit`, 8): a process that
    decodes with more models of one class than that runs the rest eagerly, with a warning.
    """
    _require_compiler(model.device)
    return torch.compile(model, dynamic=True)


def _require_compiler(device: torch.device) -> None:
    """Inductor on CPU writes C++: without a compiler it would fail at the first call."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise ConfigError("--compile needs a C++ compiler on CPU (g++); install one or drop it")
