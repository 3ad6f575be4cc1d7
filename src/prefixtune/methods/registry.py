"""Training methods behind one interface, so every method runs through the same trainer, data,
decoding and metrics. Prefix-tuning lives here; the paper's baselines register themselves from
baselines.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, PrefixConfig
from prefixtune.core.artifact import load_encoder, save_encoder, save_prefix
from prefixtune.core.attention import PrefixKV
from prefixtune.core.models import model_id
from prefixtune.core.prefix_encoder import PrefixEncoder, build_encoder, hidden_size_of
from prefixtune.methods.objective import hidden_states, target_loss


class Method:
    """What the trainer needs from a method. Subclasses own their trainable module."""

    name = "method"

    def __init__(self, model: PreTrainedModel, module: nn.Module) -> None:
        self.model = model
        self.module = module  # everything that trains (and is checkpointed)

    def parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_base(self) -> int:
        """Parameters of the pretrained model (the denominator of the trainable share)."""
        return sum(p.numel() for p in self.model.parameters())

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def save_checkpoint(self, directory: Path) -> None:
        raise NotImplementedError

    def load_checkpoint(self, directory: Path) -> None:
        raise NotImplementedError

    def save_artifact(self, directory: Path, **meta: Any) -> None:
        """The final, loadable result (for prefixes: the folded K/V)."""
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


class PrefixMethod(Method):
    """Prefix-tuning: the frozen model plus a PrefixEncoder, the only trainable module."""

    name = "prefix"

    def __init__(self, model: PreTrainedModel, encoder: PrefixEncoder) -> None:
        super().__init__(model, encoder)
        self.encoder = encoder

    def prefix_kv(self) -> PrefixKV:
        """The MLP runs once per step; its output is handed down explicitly."""
        return self.encoder()

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        hidden = hidden_states(self.model, batch, self.prefix_kv())
        return target_loss(self.model, hidden, batch["labels"])

    def save_checkpoint(self, directory: Path) -> None:
        save_encoder(directory, self.encoder, hidden_size_of(self.model))

    def load_checkpoint(self, directory: Path) -> None:
        restored = load_encoder(directory)
        self.encoder.load_state_dict(restored.state_dict())

    def save_artifact(self, directory: Path, dtype: str = "float32", **meta: Any) -> None:
        save_prefix(
            directory,
            self.encoder.bake(),
            base_model=model_id(self.model),
            prefix_config=self.encoder.config,
            dtype=dtype,
            extra=meta,
        )


MethodFactory = Callable[..., Method]
METHODS: dict[str, MethodFactory] = {}


def register(name: str) -> Callable[[MethodFactory], MethodFactory]:
    def wrap(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        return factory

    return wrap


@register("prefix")
def _prefix(model, tokenizer, prefix: PrefixConfig, seed: int = 0, **_: Any) -> PrefixMethod:
    return PrefixMethod(model, build_encoder(model, prefix, tokenizer, seed=seed))


def build_method(name: str, model, tokenizer, prefix: PrefixConfig, **options: Any) -> Method:
    """The method called `name`, set up on `model` (the model is modified in place)."""
    from prefixtune.methods import (
        baselines,  # noqa: F401  (they register themselves)
        multitask,  # noqa: F401  (they register themselves)
    )

    if name not in METHODS:
        raise ConfigError(f"--method must be one of {sorted(METHODS)}, got {name!r}")
    with torch.random.fork_rng():
        return METHODS[name](model, tokenizer, prefix=prefix, **options)
