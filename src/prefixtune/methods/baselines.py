"""The paper's baselines as training methods, run by the same trainer, data, decoding and
metrics as prefix-tuning (`prefixtune train --method NAME`):

    finetune    every weight trains; dropout stays off (the model stays in eval mode, as for every
                method here), so the methods differ only in what trains.
    ft-top2     only the top 2 transformer layers (BART: the top 2 decoder layers).
    adapter     bottleneck adapters after every attention and MLP output, holding `adapter_share`
                (0.001 or 0.03 in the paper) of the base parameters.
    embedding   prompt tuning ("EMB-n"): n = prefix.length trainable input embeddings before
                every input (init 'words': real words' embeddings). Decoder-only.
    infix       [x; INFIX; y]: PrefixEncoder keys/values seen from the last prompt token on (see
                adapters.infix_boundary for why there). Decoder-only.

Each saves only what it trains (safetensors + method.json; finetune via save_pretrained; infix
as a folded prefix with meta "method": "infix"); checkpoints hold the same at full precision.

Generation: `load_method_artifact(directory, model) -> Loaded` works for every artifact,
prefixes included. The model is a fresh copy (finetune) or `model` itself with weights loaded
(ft-top2) or adapter hooks attached (adapter); the prefix is None for those three. `embedding`
becomes an ordinary prefix, the frozen LM's keys/values of the virtual tokens, which reproduces
[virtual; x] exactly (sliding-window layers: while the input fits in the window). `infix`: the
PrefixKV must see the prompt from its last token on, `visible_from` = T - 1 for left-padded
prompts (B, T): pass `Loaded.prompt_inputs(mask)[0]` (= `infix_prompt_inputs(prefix, mask)[0]`)
to generate(), which then shifts positions from that index on and never seeds the cache. The
tests check generate() against full forwards for every method. `Loaded.logits` is a full forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import Tensor, nn
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, PrefixConfig
from prefixtune.core.artifact import (
    PREFIX_JSON,
    ArtifactError,
    check_fits,
    load_prefix,
    read_json,
    read_tensors,
    save_dtype,
)
from prefixtune.core.atomic_files import (
    atomic_write,
    atomic_write_dir,
    atomic_write_json,
    sha256_file,
)
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.models import freeze, is_encoder_decoder, model_id
from prefixtune.core.prefix_encoder import build_encoder, model_shapes
from prefixtune.methods import modules as parts
from prefixtune.methods.base import Method
from prefixtune.methods.modules import (
    infix_prompt_inputs,  # re-exported for the generator (module docstring)
)
from prefixtune.methods.objective import hidden_states, target_loss
from prefixtune.methods.prefix_method import PrefixMethod

METHOD_JSON, FORMAT = "method.json", "prefixtune-method"


class Reports:
    """Trainable count, base count and their ratio for any Method."""

    def share(self) -> float:
        return self.num_trainable() / self.num_base()

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "trainable": self.num_trainable(),
                "base": self.num_base(), "share": self.share()}  # fmt: skip


class Baseline(Reports, Method):
    """A method whose trainable weights live in (or hook into) the model. train()/eval() leave
    every module's mode alone: the model stays in eval mode, dropout off."""

    def config(self) -> dict[str, Any]:
        """Method-specific fields recorded in method.json."""
        return {}

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return target_loss(self.model, hidden_states(self.model, batch), batch["labels"])

    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass

    def tensors(self) -> dict[str, Tensor]:
        """What the method trains, by name (saved to checkpoints and artifacts)."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _meta(self, **extra: Any) -> dict[str, Any]:
        return {"format": FORMAT, "method": self.name, "base_model": model_id(self.model),
                **self.describe(), **self.config(), **extra}  # fmt: skip

    def save_checkpoint(self, directory: Path) -> None:
        save_tensors(directory, self.tensors(), self._meta())

    def load_checkpoint(self, directory: Path) -> None:
        self.load_tensors(read_method_tensors(directory)[0])

    def save_artifact(self, directory: Path, dtype: str = "float32", **meta: Any) -> None:
        tensors = {k: _cast(v, dtype) for k, v in self.tensors().items()}
        atomic_write_dir(
            Path(directory), lambda tmp: save_tensors(tmp, tensors, self._meta(**meta))
        )


def _cast(tensor: Tensor, dtype: str) -> Tensor:
    torch_dtype = save_dtype(dtype)  # refuses an unknown name for integer tensors too
    return tensor.detach().to(torch_dtype) if tensor.is_floating_point() else tensor.detach()


def save_tensors(directory: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """weights.safetensors + method.json (with the tensors' sha256)."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = atomic_write(directory / "weights.safetensors", lambda t: save_file(state, str(t)))
    atomic_write_json(directory / METHOD_JSON, {**meta, "sha256": sha256_file(path)})


def read_method_tensors(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A method artifact's weights and its method.json."""
    meta = read_json(Path(directory) / METHOD_JSON)
    return read_tensors(Path(directory) / "weights.safetensors", meta.get("sha256")), meta


# ----------------------------------------------------------------------------- the methods


class FinetuneMethod(Baseline):
    """Every weight trains (dropout off). Saves the whole model."""

    name = "finetune"

    def __init__(self, model: PreTrainedModel) -> None:
        freeze(model).requires_grad_(True)  # eval mode (no dropout), then every weight trains
        super().__init__(model, model)

    def save_checkpoint(self, directory: Path) -> None:
        save_model(self.model, str(directory / "model.safetensors"))  # tied weights stored once
        atomic_write_json(directory / METHOD_JSON, self._meta())

    def load_checkpoint(self, directory: Path) -> None:
        load_model(self.model, Path(directory) / "model.safetensors", device=str(self.model.device))

    def save_artifact(self, directory: Path, dtype: str = "float32", **meta: Any) -> None:
        state = {k: _cast(v, dtype) for k, v in self.model.state_dict().items()}

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, state_dict=state)
            atomic_write_json(tmp / METHOD_JSON, self._meta(**meta))

        atomic_write_dir(Path(directory), write)


class TopLayersMethod(Baseline):
    """Only the top `count` transformer layers train. Saves their state dict."""

    name = "ft-top2"

    def __init__(self, model: PreTrainedModel, count: int = 2) -> None:
        freeze(model)
        stack_name, stack = parts.layer_stack(model)
        first = max(0, len(stack) - count)
        self.layers = {f"{stack_name}.{i}": stack[i] for i in range(first, len(stack))}
        module = nn.ModuleList(self.layers.values()).requires_grad_(True)
        super().__init__(model, module)

    def config(self) -> dict[str, Any]:
        return {"layers": list(self.layers)}

    def tensors(self) -> dict[str, Tensor]:
        return {f"{name}.{key}": value for name, layer in self.layers.items()
                for key, value in layer.state_dict().items()}  # fmt: skip

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        parts.load_layers(self.model, tensors)


class AdapterMethod(Baseline):
    """Bottleneck adapters (see adapters.py) on the frozen model; saves the adapters only."""

    name = "adapter"

    def __init__(self, model: PreTrainedModel, adapters: parts.Adapters, share: float) -> None:
        freeze(model)
        super().__init__(model, adapters.to(model.device).attach(model))
        self.adapters, self.requested_share = adapters, share

    def config(self) -> dict[str, Any]:
        return {"bottleneck": self.adapters.bottleneck, "sites": self.adapters.sites,
                "requested_share": self.requested_share}  # fmt: skip

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.adapters.state_dict())

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.adapters.load_state_dict(tensors)


class EmbeddingMethod(Baseline):
    """Prompt tuning: n virtual input embeddings before every input. Saves the n x d matrix."""

    name = "embedding"

    def __init__(self, model: PreTrainedModel, init: Tensor) -> None:
        freeze(model)
        super().__init__(model, parts.VirtualTokens(init).to(model.device))

    def config(self) -> dict[str, Any]:
        return {"length": self.module.embeddings.shape[0]}

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        inputs, labels = parts.prepend_virtual(self.model, self.module.embeddings, batch)
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        return target_loss(self.model, hidden, labels)

    def tensors(self) -> dict[str, Tensor]:
        return {"embeddings": self.module.embeddings}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.module.embeddings.copy_(tensors["embeddings"])


class InfixMethod(Reports, PrefixMethod):
    """[x; INFIX; y] with a PrefixEncoder's keys/values; saved as a folded prefix."""

    name = "infix"

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        boundary = parts.infix_boundary(batch["labels"])
        prefix, positions = parts.place_infix(self.prefix_kv(), batch["attention_mask"], boundary)
        hidden = hidden_states(self.model, batch, prefix, position_ids=positions)
        return target_loss(self.model, hidden, batch["labels"])

    def save_artifact(self, directory: Path, dtype: str = "float32", **meta: Any) -> None:
        super().save_artifact(directory, dtype=dtype, **{**meta, "method": self.name})


# ----------------------------------------------------------------------------- factories


def _decoder_only(model: PreTrainedModel, method: str) -> None:
    if is_encoder_decoder(model):
        raise ConfigError(f"--method {method} is for decoder-only models; "
                          f"{type(model).__name__} is an encoder-decoder")  # fmt: skip


def build_finetune(
    model, tokenizer, prefix: PrefixConfig, seed: int = 0, **_: Any
) -> FinetuneMethod:
    return FinetuneMethod(model)


def build_top2(model, tokenizer, prefix: PrefixConfig, seed: int = 0, **_: Any) -> TopLayersMethod:
    return TopLayersMethod(model, count=2)


def build_adapter(model, tokenizer, prefix: PrefixConfig, seed: int = 0,
             adapter_share: float = 0.001, **_: Any) -> AdapterMethod:  # fmt: skip
    torch.manual_seed(seed)
    return AdapterMethod(model, parts.build_adapters(model, adapter_share), adapter_share)


def build_embedding(
    model, tokenizer, prefix: PrefixConfig, seed: int = 0, **_: Any
) -> EmbeddingMethod:
    _decoder_only(model, "embedding")
    torch.manual_seed(seed)
    return EmbeddingMethod(model, parts.initial_embeddings(model, prefix, tokenizer))


def build_infix(model, tokenizer, prefix: PrefixConfig, seed: int = 0, **_: Any) -> InfixMethod:
    _decoder_only(model, "infix")
    return InfixMethod(model, build_encoder(model, prefix, tokenizer, seed=seed))


# ----------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A trained method ready for evaluation: the model to run and the prefix to inject."""

    method: str
    model: PreTrainedModel
    prefix: PrefixKV | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None  # adapters attached to `model` (detach() removes them)

    def prompt_inputs(self, attention_mask: Tensor) -> tuple[PrefixKV | None, Tensor | None]:
        """Prefix and position ids (None: the default) for left-padded prompts (B, T)."""
        if self.method == "infix":
            return infix_prompt_inputs(self.prefix, attention_mask)
        return self.prefix, None

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor,
               boundary: Tensor | None = None) -> Tensor:  # fmt: skip
        """(B, T, V) logits; for infix, `boundary` (B,) overrides the last-prompt-token index."""
        prefix, positions = self.prompt_inputs(attention_mask)
        if boundary is not None and self.method == "infix":
            prefix, positions = parts.place_infix(self.prefix, attention_mask, boundary)
        kwargs = {} if positions is None else {"position_ids": positions}
        if prefix is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:
            out = prefixed_forward(self.model, input_ids, attention_mask, prefix, **kwargs)
        return out.logits


def _load_finetune(directory: Path, model: PreTrainedModel, meta: dict[str, Any]) -> Loaded:
    loaded = type(model).from_pretrained(directory, dtype=model.dtype)
    return Loaded("finetune", freeze(loaded).to(model.device), meta=meta)


def _load_top2(directory: Path, model: PreTrainedModel, meta: dict[str, Any]) -> Loaded:
    parts.load_layers(model, read_method_tensors(directory)[0])
    return Loaded("ft-top2", model, meta=meta)


def _load_adapter(directory: Path, model: PreTrainedModel, meta: dict[str, Any]) -> Loaded:
    if parts.adapter_sites(model) != meta["sites"]:
        raise ArtifactError(f"{directory}: adapters were made for other layers or widths")
    adapters = parts.Adapters(meta["sites"], meta["bottleneck"])
    adapters.load_state_dict(read_method_tensors(directory)[0])
    adapters.to(model.device).attach(model)
    return Loaded("adapter", model, meta=meta, module=adapters)


def _load_embedding(directory: Path, model: PreTrainedModel, meta: dict[str, Any]) -> Loaded:
    _decoder_only(model, "embedding")
    embeddings = read_method_tensors(directory)[0]["embeddings"]
    return Loaded("embedding", model, parts.virtual_prefix(model, embeddings.float()), meta)


LOADERS = {"finetune": _load_finetune, "ft-top2": _load_top2, "adapter": _load_adapter,
           "embedding": _load_embedding}  # fmt: skip


def load_method_artifact(directory: str | Path, model: PreTrainedModel) -> Loaded:
    """Load any method's artifact (a baseline's method.json or a prefix/infix prefix.json)."""
    directory = Path(directory)
    if (directory / METHOD_JSON).exists():
        meta = read_json(directory / METHOD_JSON)
        if meta.get("method") not in LOADERS:
            raise ArtifactError(f"{directory / METHOD_JSON}: unknown method {meta.get('method')!r}")
        return LOADERS[meta["method"]](directory, model, meta)
    if not (directory / PREFIX_JSON).exists():
        raise ArtifactError(f"{directory}: no {METHOD_JSON} or {PREFIX_JSON} (not an artifact)")
    folded = load_prefix(directory)
    method = folded.meta.get("method", "prefix")
    if method == "infix":
        _decoder_only(model, "infix")
    check_fits(folded.shapes(), model_shapes(model), str(directory))
    return Loaded(method, model, folded.to_prefix_kv(model.device), folded.meta)
