"""The one place that knows every training method: name -> factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from prefixtune.config import ConfigError, PrefixConfig
from prefixtune.methods import baselines, multitask, prefix_method
from prefixtune.methods.base import Method

MethodFactory = Callable[..., Method]
METHODS: dict[str, MethodFactory] = {
    "prefix": prefix_method.build,
    "finetune": baselines.build_finetune,
    "ft-top2": baselines.build_top2,
    "adapter": baselines.build_adapter,
    "embedding": baselines.build_embedding,
    "infix": baselines.build_infix,
    "multitask": multitask.build,
}


def build_method(name: str, model, tokenizer, prefix: PrefixConfig, **options: Any) -> Method:
    """The method called `name`, set up on `model` (the model is modified in place)."""
    if name not in METHODS:
        raise ConfigError(f"--method must be one of {sorted(METHODS)}, got {name!r}")
    with torch.random.fork_rng():
        return METHODS[name](model, tokenizer, prefix=prefix, **options)
