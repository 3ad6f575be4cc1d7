"""Prefix-tuning as a method: a PrefixEncoder trained in front of the frozen model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.config import PrefixConfig
from prefixtune.core.artifact import load_encoder, save_encoder, save_prefix
from prefixtune.core.attention import PrefixKV
from prefixtune.core.models import model_id
from prefixtune.core.prefix_encoder import PrefixEncoder, build_encoder, hidden_size_of
from prefixtune.methods.base import Method
from prefixtune.methods.objective import hidden_states, target_loss


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


def build(model, tokenizer, prefix: PrefixConfig, seed: int = 0, **_: Any) -> PrefixMethod:
    return PrefixMethod(model, build_encoder(model, prefix, tokenizer, seed=seed))
