"""Resumable training checkpoints, written as a whole or not at all.

out/checkpoint/ holds the method's trainable state (for prefixes: encoder.safetensors with the
MLP) plus trainer.pt (optimizer, scheduler, step, best dev loss, RNG states). A new checkpoint
is written into a temp directory and swapped in by renames, so a crash leaves the previous one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixtune.core.atomic_files import atomic_write_dir
from prefixtune.methods.base import Method

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer.pt"


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, method: Method, optimizer, scheduler, *, step: int, extra: dict[str, Any]
) -> Path:
    """Write out/checkpoint atomically (temp dir, then rename over the old one)."""

    def write(tmp: Path) -> None:
        method.save_checkpoint(tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            **extra,
        }
        torch.save(state, tmp / TRAINER_STATE)

    return atomic_write_dir(out / CHECKPOINT_DIR, write)


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (a crash mid-swap leaves it under .checkpoint.old)."""
    for candidate in (out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old"):
        if (candidate / TRAINER_STATE).exists():
            return candidate
    return None


def load_checkpoint(directory: Path, method: Method, optimizer, scheduler) -> dict[str, Any]:
    """Restore method, optimizer, scheduler and RNG; returns the trainer state (step, ...)."""
    method.load_checkpoint(directory)
    state = torch.load(directory / TRAINER_STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state
