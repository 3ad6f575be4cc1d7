"""PEFT prefix-tuning adapters <-> prefixtune folded prefixes (model cards: interop/model_card.py).

A PEFT prefix-tuning adapter is a directory with
    adapter_config.json        peft_type PREFIX_TUNING, num_virtual_tokens P, num_layers L,
                               num_attention_heads H_kv, token_dim H_kv * D, prefix_projection
    adapter_model.safetensors  one tensor `prompt_embeddings` (P, L*2*H_kv*D)
and `prompt_embeddings` is laid out layer-major, then keys/values, then heads: exactly our flat
layout (`prefix.stack_flat`), so conversion is a reshape and round trips are bit-exact.

What we learned from PEFT's source (peft 0.21, transformers 5):
- PEFT saves the folded table even for adapters trained with `prefix_projection=True` (it runs
  the MLP at save time and reloads in inference mode as a plain table). Import also accepts a
  file holding the raw MLP weights (`embedding.weight`, `transform.{0,2}.*`) and runs
  Embedding -> Linear -> tanh -> Linear once to fold it. Export always writes the folded form.
- Grouped-query attention: PEFT sizes the prefix by key/value heads (num_attention_heads = H_kv,
  token_dim = H_kv * head_dim) and recomputes that from the model config on every load, so
  export checks our geometry against what PEFT derives from the config.
- Positions: PEFT places the prefix in the KV cache, so the model offsets real-token positions
  by P, as prefixtune does. For a left-padded batch pass `position_ids` (mask cumsum - 1, what
  `generate` does); PEFT adds P to them. Without them, padded rows are also shifted by padding.
- Encoder-decoder models (SEQ_2_SEQ_LM) are refused both ways: PEFT 0.21 gives the encoder and
  cross-attention no prefix (it empties the cross-attention cache), feeds decoder layer i the
  table's layer 2i mod L (odd table layers are never read, and layers i and i + L/2 share one
  prefix), and shifts decoder positions by P where prefixtune keeps them. No prefixtune
  encoder/decoder/cross prefix has a PEFT equivalent.
- Sliding-window attention (e.g. Gemma-3): in PEFT the prefix is an ordinary cached token that
  slides out of the window once P + T exceeds it; prefixtune keeps it visible. Logits agree only
  while P + T <= window, so export and import warn.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from prefixtune.core.artifact import (
    ArtifactError,
    FoldedPrefix,
    check_fits,
    trained_separator,
)
from prefixtune.core.models import is_encoder_decoder, model_id, text_config
from prefixtune.core.prefix_encoder import KindShape, flatten_stack, model_shapes, stack_flat
from prefixtune.interop.formats import (
    PEFT_CONFIG,
    PEFT_KEY,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_BIN,
    SEQ2SEQ_REFUSAL,
)
from prefixtune.interop.model_card import write_model_card

log = logging.getLogger(__name__)

_MLP_KEYS = ("transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")


# ---------------------------------------------------------------- geometry


def peft_shape(model_config: PretrainedConfig) -> KindShape:
    """The prefix geometry PEFT derives from a decoder-only model's config (kv heads for GQA)."""
    cfg = text_config(model_config)

    def first(*names: str) -> int | None:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)

    layers = first("num_hidden_layers", "num_layers", "n_layer")
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if layers is None or hidden is None or heads is None:
        raise ArtifactError(
            f"{type(cfg).__name__}: cannot read layers/hidden size/heads for a PEFT adapter"
        )
    kv_heads = first("num_key_value_heads")
    if kv_heads is None:  # PEFT reads head_dim only for models with key/value heads
        return KindShape(int(layers), int(heads), int(hidden) // int(heads))
    head_dim = first("head_dim") or hidden // heads
    return KindShape(int(layers), int(kv_heads), int(head_dim))


def sliding_window(model_config: PretrainedConfig) -> int | None:
    """The attention window of a model with sliding-window layers, else None."""
    cfg = text_config(model_config)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if not window or (layer_types and not any("sliding" in t for t in layer_types)):
        return None
    return int(window)


def _warn_sliding(model_config: PretrainedConfig, length: int) -> None:
    window = sliding_window(model_config)
    if window is not None:
        warnings.warn(
            f"this model has sliding-window attention (window {window}): PEFT lets the prefix "
            f"slide out of the window, prefixtune keeps it visible, so the two agree only on "
            f"inputs of at most {window - length} tokens",
            stacklevel=3,
        )


# ---------------------------------------------------------------- writing directories


def publish_dir(
    out_dir: str | Path, build: Callable[[Path], None], *, overwrite: bool, marker: str
) -> Path:
    """Build a directory in a temp dir beside `out_dir`, then rename it into place.

    An existing non-empty `out_dir` is replaced only with `overwrite` and only when it holds
    `marker` (an earlier output of the same kind), never an arbitrary directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ArtifactError(f"{out_dir}: already exists and is not empty (--force replaces it)")
        if not (out_dir / marker).exists():
            raise ArtifactError(f"{out_dir}: not empty and has no {marker}; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old: Path | None = None
    try:
        tmp.chmod(0o755)
        build(tmp)
        if out_dir.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
            )
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _peft_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- export


def export_peft(
    prefix: FoldedPrefix,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    model_config: PretrainedConfig,
    overwrite: bool = False,
    task: str = "",
    data: str = "",
    metrics: dict[str, Any] | None = None,
    command: str = "",
    card_base_model: str | None = None,
) -> Path:
    """Write `prefix` as a PEFT prefix-tuning adapter (config, weights, README) in `out_dir`.

    `peft.PeftModel.from_pretrained(base, out_dir)` then gives prefixtune's logits. Raises
    ArtifactError for encoder-decoder models, infix artifacts (PEFT shows a prefix to every
    position) and prefixes that do not fit `model_config`. The card states the prompt format.
    """
    if prefix.meta.get("method", "prefix") != "prefix":
        raise ArtifactError(
            f"cannot export a {prefix.meta['method']!r} artifact: PEFT prefixes are seen by "
            "every position"
        )
    if getattr(model_config, "is_encoder_decoder", False) or set(prefix.kv) != {"self"}:
        raise ArtifactError(f"cannot export '{sorted(prefix.kv)}' prefixes: {SEQ2SEQ_REFUSAL}")
    shape = peft_shape(model_config)
    check_fits(prefix.shapes(), {"self": shape}, f"{base_model_name_or_path} (PEFT geometry)")
    _warn_sliding(model_config, prefix.length)
    flat = flatten_stack(prefix.kv["self"].float()).contiguous()  # (P, L*2*H_kv*D)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": shape.heads * shape.head_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": shape.heads,
        "num_layers": shape.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prefix.length,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": shape.heads * shape.head_dim,
    }
    if version := _peft_version():
        config["peft_version"] = version

    def build(tmp: Path) -> None:
        save_file({PEFT_KEY: flat}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_model_card(
            tmp,
            base_model=card_base_model or base_model_name_or_path,
            task=task,
            data=data,
            metrics=metrics,
            command=command,
            separator=trained_separator(prefix.meta),
        )

    return publish_dir(out_dir, build, overwrite=overwrite, marker=PEFT_CONFIG)


# ---------------------------------------------------------------- import


def read_peft_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not found (expected a PEFT adapter directory)")
    path = directory / PEFT_CONFIG
    if not path.exists():
        raise ArtifactError(f"{path}: not found (is {directory} a PEFT adapter directory?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: corrupt JSON ({err})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise ArtifactError(
            f"{path}: peft_type is {peft_type!r}, but only PREFIX_TUNING adapters can be imported"
        )
    if config.get("task_type") == "SEQ_2_SEQ_LM" or config.get("num_transformer_submodules") == 2:
        raise ArtifactError(f"{path}: a SEQ_2_SEQ_LM adapter; {SEQ2SEQ_REFUSAL}")
    for name in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ArtifactError(f"{path}: field {name!r} must be a positive integer, got {value!r}")
    if config["token_dim"] % config["num_attention_heads"]:
        raise ArtifactError(
            f"{path}: token_dim {config['token_dim']} is not a multiple of "
            f"num_attention_heads {config['num_attention_heads']}"
        )
    return config


def _read_peft_weights(directory: Path) -> tuple[Path, dict[str, Tensor]]:
    path = directory / PEFT_WEIGHTS
    if not path.exists() and (directory / PEFT_WEIGHTS_BIN).exists():
        path = directory / PEFT_WEIGHTS_BIN
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and EOF errors all mean a bad file
            raise ArtifactError(f"{path}: corrupt or unreadable PyTorch file ({err})") from None
        if not isinstance(state, dict):
            raise ArtifactError(f"{path}: expected a state dict")
        return path, state
    if not path.exists():
        raise ArtifactError(f"{path}: not found (nor {PEFT_WEIGHTS_BIN})")
    try:
        return path, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def _flat_table(state: dict[str, Tensor], path: Path) -> Tensor:
    """(P, L*2*token_dim) from PEFT's folded `prompt_embeddings` or its raw prompt encoder."""
    if PEFT_KEY in state:
        return state[PEFT_KEY].float()
    # raw encoder weights, e.g. 'prompt_encoder.default.embedding.weight'
    raw = {key.split("prompt_encoder.")[-1].removeprefix("default."): t for key, t in state.items()}
    if "embedding.weight" not in raw:
        raise ArtifactError(
            f"{path}: no '{PEFT_KEY}' or prompt-encoder weights (has {sorted(state)[:6]})"
        )
    embedding = raw["embedding.weight"].float()
    if not any(key in raw for key in _MLP_KEYS):
        return embedding
    missing = [key for key in _MLP_KEYS if key not in raw]
    if missing:
        raise ArtifactError(f"{path}: prefix projection weights incomplete, missing {missing}")
    w0, b0, w2, b2 = (raw[key].float() for key in _MLP_KEYS)
    with torch.no_grad():
        try:  # PEFT's projection: Embedding -> Linear -> tanh -> Linear, run once
            return F.linear(torch.tanh(F.linear(embedding, w0, b0)), w2, b2)
        except RuntimeError as err:
            raise ArtifactError(f"{path}: prefix projection weights do not chain ({err})") from None


def import_peft(peft_dir: str | Path, model: PreTrainedModel) -> FoldedPrefix:
    """Read a PEFT prefix-tuning adapter as a folded prefix for `model` (a decoder-only LM)."""
    directory = Path(peft_dir)
    config = read_peft_config(directory)
    path, state = _read_peft_weights(directory)
    if is_encoder_decoder(model):
        raise ArtifactError(
            f"{directory}: cannot import for an encoder-decoder model; {SEQ2SEQ_REFUSAL}"
        )
    length, layers = config["num_virtual_tokens"], config["num_layers"]
    heads, token_dim = config["num_attention_heads"], config["token_dim"]
    flat = _flat_table(state, path)
    expected = (length, layers * 2 * token_dim)
    if tuple(flat.shape) != expected:
        raise ArtifactError(
            f"{path}: prefix table has shape {tuple(flat.shape)}, but {PEFT_CONFIG} says "
            f"{expected} (num_virtual_tokens x num_layers*2*token_dim)"
        )
    shape = KindShape(layers, heads, token_dim // heads)
    check_fits({"self": shape}, model_shapes(model), str(path))
    _warn_sliding(model.config, length)
    kv = stack_flat(flat, shape)[0].contiguous()  # (L, 2, H_kv, P, D)
    meta = {
        "base_model": config.get("base_model_name_or_path") or model_id(model),
        "source": "peft",
        "peft_dir": str(directory),
        "peft_prefix_projection": bool(config.get("prefix_projection")),
        "length": length,
    }
    return FoldedPrefix({"self": kv}, meta)


# ---------------------------------------------------------------- model card


# ---------------------------------------------------------------- command line
