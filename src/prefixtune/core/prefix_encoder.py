"""PrefixEncoder: the only trainable module. A table P (P x 2*L*H_kv*D per attention kind) or
the paper's MLP reparameterisation (Embedding -> Linear -> tanh -> Linear), with random, zero
and real-word initialisation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, PrefixConfig
from prefixtune.core.attention import KVCapture, PrefixKV
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.models import freeze, text_config


@dataclass(frozen=True)
class KindShape:
    """Prefix geometry of one attention kind: layers, key/value heads and head size."""

    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Numbers per prefix position: 2 * L * H_kv * D."""
        return 2 * self.layers * self.heads * self.head_dim

    def describe(self) -> str:
        return f"{self.layers} layers x {self.heads} kv heads x head_dim {self.head_dim}"


def _probe_inputs(model: PreTrainedModel, ids: Tensor) -> dict[str, Tensor]:
    """Model inputs that run `ids` through every attention (decoder too, for encoder-decoders)."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


@torch.no_grad()
def capture_kv(model: PreTrainedModel, ids: Tensor) -> dict[str, Tensor]:
    """Each attention kind's keys/values for token ids (1, P): kind -> (L, 2, H_kv, P, D).

    Keys are recorded as attention sees them (after rotary embedding and q/k norms), so using
    them as a prefix reproduces the frozen model on [words; x] exactly.
    """
    enable_prefixes(model)
    capture = KVCapture()
    model(**_probe_inputs(model, ids.to(model.device)), prefix_kv=capture, use_cache=False)
    by_kind: dict[str, list[tuple[int, Tensor]]] = {}
    for site, (key, value) in capture.records.items():
        by_kind.setdefault(site.kind, []).append((site.layer, torch.stack([key[0], value[0]])))
    return {
        kind: torch.stack([kv for _, kv in sorted(layers, key=lambda item: item[0])]).float()
        for kind, layers in by_kind.items()
    }


def model_shapes(model: PreTrainedModel) -> dict[str, KindShape]:
    """Prefix geometry per attention kind, read off one probe forward pass."""
    shapes = {}
    for kind, kv in capture_kv(model, torch.zeros(1, 1, dtype=torch.long)).items():
        layers, _, heads, _, head_dim = kv.shape  # (L, 2, H_kv, 1, D)
        shapes[kind] = KindShape(layers, heads, head_dim)
    return shapes


def stack_flat(flat: Tensor, shape: KindShape) -> Tensor:
    """(P, 2*L*H*D) -> (1, L, 2, H, P, D): the PEFT/paper layout (layer-major, then k/v)."""
    p_len = flat.shape[0]
    stacked = flat.view(p_len, shape.layers, 2, shape.heads, shape.head_dim)
    return stacked.permute(1, 2, 3, 0, 4).unsqueeze(0)


def flatten_stack(kv: Tensor) -> Tensor:
    """(L, 2, H, P, D) -> (P, 2*L*H*D), the inverse of `stack_flat`."""
    layers, _, heads, p_len, head_dim = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p_len, layers * 2 * heads * head_dim)


class KindPrefix(nn.Module):
    """The prefix of one attention kind: a table, or an MLP over a small embedding."""

    def __init__(self, config: PrefixConfig, shape: KindShape, embed_dim: int) -> None:
        super().__init__()
        self.shape = shape
        if config.reparam:
            self.embedding = nn.Embedding(config.length, embed_dim)
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, config.mlp_hidden),
                nn.Tanh(),
                nn.Linear(config.mlp_hidden, shape.width),
            )
        else:
            self.table = nn.Parameter(torch.randn(config.length, shape.width))

    @property
    def reparam(self) -> bool:
        return hasattr(self, "mlp")

    def flat(self) -> Tensor:
        """(P, 2*L*H*D): the MLP runs once over the P rows, never per batch row."""
        if self.reparam:
            return self.mlp(self.embedding.weight)
        return self.table

    def zero_(self) -> None:
        with torch.no_grad():
            target = self.mlp[-1] if self.reparam else None
            if target is None:
                self.table.zero_()
            else:
                target.weight.zero_()
                target.bias.zero_()

    def fit_(self, target: Tensor) -> float:
        """Make flat() equal target (P, width); returns the max abs residual.

        Table: copy. MLP: keep the random embedding and first layer, and solve the output layer
        by least squares (float64), which is exact when P <= mlp_hidden.
        """
        with torch.no_grad():
            if not self.reparam:
                self.table.copy_(target)
                return 0.0
            out = self.mlp[-1]
            hidden = self.mlp[:-1](self.embedding.weight).double()  # (P, hidden)
            design = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)
            solution = torch.linalg.lstsq(design, target.double(), driver="gelsd").solution
            out.weight.copy_(solution[:-1].T.to(out.weight.dtype))  # (width, hidden)
            out.bias.copy_(solution[-1].to(out.bias.dtype))
            return (self.flat() - target).abs().max().item()


class PrefixEncoder(nn.Module):
    """All of a task's prefixes (one per attention kind). forward() -> PrefixKV with N = 1."""

    def __init__(self, config: PrefixConfig, shapes: dict[str, KindShape], hidden_size: int):
        super().__init__()
        kinds = config.kinds or tuple(shapes)
        missing = [kind for kind in kinds if kind not in shapes]
        if missing:
            raise ConfigError(f"prefix kinds {missing} not in this model (it has {list(shapes)})")
        self.config = config
        self.shapes = {kind: shapes[kind] for kind in kinds}
        embed_dim = config.embed_dim or hidden_size
        self.parts = nn.ModuleDict(
            {kind: KindPrefix(config, shape, embed_dim) for kind, shape in self.shapes.items()}
        )

    def forward(self) -> PrefixKV:
        """Compute every kind's prefix once for this step: kind -> (1, L, 2, H_kv, P, D)."""
        return PrefixKV(
            {kind: stack_flat(part.flat(), part.shape) for kind, part in self.parts.items()}
        )

    @torch.no_grad()
    def bake(self) -> dict[str, Tensor]:
        """Fold the MLP away: kind -> detached (L, 2, H_kv, P, D) keys/values."""
        return {kind: kv[0].detach().clone() for kind, kv in self().kv.items()}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def hidden_size_of(model: PreTrainedModel) -> int:
    config = text_config(model.config)
    return int(getattr(config, "hidden_size", None) or config.d_model)


def word_ids(tokenizer, text: str, length: int) -> Tensor:
    """Token ids (1, P) for a real-word init; cycled or cut to `length` when length > 0."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"prefix init_text {text!r} tokenises to no tokens")
    if length > 0:
        ids = [ids[i % len(ids)] for i in range(length)]
    return torch.tensor([ids], dtype=torch.long)


def build_encoder(
    model: PreTrainedModel, config: PrefixConfig, tokenizer=None, *, seed: int | None = None
) -> PrefixEncoder:
    """A PrefixEncoder sized for `model`, initialised; the model is frozen (base weights never
    train) and its attention routed through prefixtune.

    Raises `UnsupportedModelError` (a ValueError, from prefixtune.core.verify) for a model that
    prefixtune cannot serve faithfully: routing is verified once per model (the model without a
    prefix is unchanged, prefixtune's attention is in the path at every attention site, and a
    prefix of the model's own keys/values reproduces it), see `enable_prefixes`.
    """
    freeze(model)
    enable_prefixes(model)  # verifies the model (cached on it) before anything is sized for it
    if seed is not None:
        torch.manual_seed(seed)
    shapes = model_shapes(model)
    targets = None
    if config.init == "words":
        if tokenizer is None:
            raise ConfigError("prefix init 'words' needs the model's tokenizer")
        ids = word_ids(tokenizer, config.init_text, config.length)
        targets = capture_kv(model, ids)
        config = PrefixConfig(**{**config.__dict__, "length": ids.shape[1]})
    encoder = PrefixEncoder(config, shapes, hidden_size_of(model))
    for kind, part in encoder.parts.items():
        if config.init == "zero":
            part.zero_()
        elif targets is not None:
            residual = part.fit_(flatten_stack(targets[kind]))
            if residual > 1e-3:
                warnings.warn(
                    f"real-word init of '{kind}' prefixes fits only to {residual:.2e} "
                    f"(prefix length {config.length} > mlp_hidden {config.mlp_hidden})",
                    stacklevel=2,
                )
    return encoder.to(model.device)
