"""The interface every training method implements, so every method runs through the same
trainer, data, decoding and metrics."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel


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
