"""Typed configuration: one dataclass per concern. CLI flags and JSON configs map onto these."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INIT_METHODS = ("random", "zero", "words")
DECODER_ONLY_KINDS = ("self",)
ENCODER_DECODER_KINDS = ("encoder", "decoder", "cross")


class ConfigError(ValueError):
    """A configuration value a user can fix; the message names the field."""


@dataclass
class PrefixConfig:
    """What prefix to train and how it is parameterised (Li & Liang 2021, section 4)."""

    length: int = 10
    """Number of prefix positions P (for init 'words', 0 means: as many as the words' tokens)."""
    reparam: bool = True
    """Train through the MLP reparameterisation (Embedding -> Linear -> tanh -> Linear)."""
    mlp_hidden: int = 512
    """Hidden width of the reparameterisation MLP (the paper's 512)."""
    embed_dim: int = 0
    """Width of the MLP input P' (0: the model's hidden size, as the paper's code)."""
    init: str = "random"
    """Initialisation: 'random', 'zero' or 'words' (the frozen LM's activations of init_text)."""
    init_text: str = ""
    """The real words for init 'words', e.g. 'table-to-text:'."""
    kinds: tuple[str, ...] = ()
    """Attentions that get prefixes: 'self' for decoder-only; any of 'encoder', 'decoder',
    'cross' for encoder-decoder models. Empty: all attentions the model has."""

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        if self.init not in INIT_METHODS:
            raise ConfigError(f"prefix init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.init == "words":
            if not self.init_text.strip():
                raise ConfigError("prefix init 'words' needs a non-empty init_text")
            if self.length < 0:
                raise ConfigError(
                    f"prefix length must be >= 0 with init 'words', got {self.length}"
                )
        elif self.length <= 0:
            raise ConfigError(f"prefix length must be a positive integer, got {self.length}")
        if self.mlp_hidden <= 0:
            raise ConfigError(f"prefix mlp_hidden must be positive, got {self.mlp_hidden}")
        unknown = set(self.kinds) - set(DECODER_ONLY_KINDS + ENCODER_DECODER_KINDS)
        if unknown:
            raise ConfigError(f"unknown prefix kinds {sorted(unknown)}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict[str, Any], *, source: str = "config") -> Any:
    """Build a config dataclass from a dict, naming any unknown field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from a file with an error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


__all__ = [
    "ConfigError",
    "PrefixConfig",
    "from_dict",
    "to_dict",
    "load_json",
]
