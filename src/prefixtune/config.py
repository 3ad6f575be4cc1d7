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
QUANTIZE_MODES = ("none", "int8", "int4")
METRIC_TASKS = ("e2e", "webnlg", "dart", "xsum", "generic")  # metric suites (metrics.score)
REPORT_TO = ("none", "tensorboard")  # TrainConfig.report_to: experiment trackers


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


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's table-to-text settings (section 5.2)."""

    data: str = "e2e"
    """Dataset: e2e, webnlg, dart, xsum, builtin, or a .jsonl file of {"source", "target"}.
    Several, comma-separated, train one prefix per task in one run: 'e2e,webnlg' or
    'e2e=e2e,web=data/web.jsonl' (NAME=DATASET; see docs/SCALING.md). Hugging Face `datasets`
    inputs too: a .parquet/.csv/.json/.arrow file, a folder of train.*/dev.*(validation.*)/test.*
    files or a save_to_disk folder, or a hub id ('hf:owner/name' or 'owner/name')."""
    source_field: str = "source"
    """Column with the source text (Parquet/CSV/JSON/`datasets` inputs; .jsonl when changed)."""
    target_field: str = "target"
    """Column with the target: a string, or a list of references (one training example each)."""
    messages_field: str = ""
    """Column of chat conversations ([{role, content}, ...]) to train on instead of the
    source/target columns ('' for none)."""
    streaming: bool = False
    """Stream the training data (files larger than memory): length buckets form within each
    --stream-buffer examples; the run needs --max-steps or counts one pass first."""
    stream_buffer: int = 10000
    """Examples held at a time when --streaming (the length-bucketing window)."""
    model: str = ""
    """Base model: a hub id or local directory; 'gemma3-270m' for the embedded Gemma-3-270M;
    empty for the embedded default (SmolLM2-135M)."""
    method: str = "prefix"
    """Training method: prefix, or a baseline (finetune, ft-top2, adapter, embedding, infix);
    multitask: one prefix per task of --data (implied when --data names several tasks)."""
    adapter_share: float = 0.001
    """Adapter baseline: trainable share of the base model (the paper's 0.001 and 0.03)."""
    out: str = "runs/e2e"
    """Output directory: prefix/, checkpoint/, log.jsonl, run.json."""
    train_split: str = "train"
    """Split to train on."""
    dev_split: str = "dev"
    """Split for the dev loss ('' for none)."""
    train_size: int = 0
    """Subsample this many training examples (0: all), deterministic given the seed."""
    subsample_seed: int = -1
    """Seed of the --train-size subsample (-1: --seed), so subsamples and training seeds can vary
    apart (the paper's low-data runs)."""
    dev_size: int = 200
    """Dev examples used for the dev loss each evaluation (0: all)."""
    epochs: float = 10.0
    """Passes over the training data (the paper: 10)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: as many as the epochs give)."""
    batch_size: int = 5
    """Examples per micro-batch (the paper: 5)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_batch_tokens: int = 0
    """Cap rows x longest row per batch (0: no cap)."""
    lr: float = 5e-5
    """AdamW learning rate (the paper: 5e-5)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the linear decay to zero."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: off)."""
    autocast: str = "auto"
    """Compute dtype: auto (bf16 only where the hardware has native bf16), float32, bfloat16."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, more time; for long inputs)."""
    fuse_projections: bool = False
    """Run the frozen model's Q/K/V and gate/up projections as one matmul each (Llama-family;
    weights concatenated once, saved weights unchanged; more memory: see docs/PERFORMANCE.md).
    Prefix-style methods on decoder-only models only: a method that trains base weights, or
    an encoder-decoder model, is refused."""
    shard_base: bool = False
    """Under torchrun: shard the frozen model's blocks across the processes with FSDP2 (for a
    base larger than one device; the prefix stays replicated). Not with --fuse-projections."""
    compile: bool = False
    """Compile the training loss with torch.compile (inductor): fused kernels, 1.1-1.2x on
    CPU and less memory, after minutes of compiling (needs a C++ compiler on CPU)."""
    quantize: str = "none"
    """Frozen base weights: none, int8 (torchao weight-only: linear layers in int8, the prefix
    trains on them; the artifact loads on the unquantized model) or int4 (where torchao has a
    kernel for the device). Needs pip install prefixtune[quantize]."""
    separator: str = "\n"
    """Decoder-only prompt format: [BOS] source SEPARATOR target (e.g. '\nTL;DR: ' for
    summaries). Kept with the run and the prefix artifact; evaluate, generate and serve reuse it."""
    system: str = ""
    """Chat data ({"messages": [...]} lines): a system message put first in every conversation
    that has none (empty: none). Kept with the run and the prefix artifact, like the template."""
    max_source_tokens: int = 256
    """Truncate sources to this many tokens (counted and reported)."""
    max_target_tokens: int = 128
    """Truncate targets to this many tokens (counted and reported)."""
    seed: int = 0
    """Seed for initialisation, subsampling and batch order."""
    eval_every: int = 0
    """Evaluate the dev loss every N steps (0: once per epoch)."""
    patience: int = 0
    """Stop early once the dev loss has not improved for this many evaluations in a row
    (0: train every step). The kept weights are the best by dev loss either way."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    log_every: int = 10
    """Append a line to log.jsonl every N steps."""
    save_dtype: str = "float32"
    """dtype of the folded prefix artifact: float32 or bfloat16."""
    resume: bool = False
    """Continue from out/checkpoint if present (bit-exact)."""
    progress: bool = True
    """Show a progress bar."""
    report_to: str = "none"
    """Also write what log.jsonl gets as scalars for a tracker: none or tensorboard
    (event files under out/tensorboard/; view with `tensorboard --logdir OUT`)."""

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        non_negative = ("train_size", "dev_size", "max_steps", "warmup_steps", "eval_every", "patience",
                        "checkpoint_every", "max_batch_tokens", "grad_clip", "weight_decay")  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("--epochs must be > 0 (or set --max-steps)")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"--quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(
                f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}"
            )


GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"num_beams": 1, "do_sample": False},
    "table-to-text": {"num_beams": 5, "length_penalty": 1.0},  # paper: beam 5
    "summarization": {"num_beams": 6, "length_penalty": 0.8},  # paper: beam 6, length norm 0.8
}


@dataclass
class GenerateConfig:
    """Decoding settings (token ids in, token ids out)."""

    max_new_tokens: int = 64
    """Most tokens generated per input (EOS ends a row earlier)."""
    num_beams: int = 1
    """Beam size; 1 is greedy (or sampling with do_sample)."""
    length_penalty: float = 1.0
    """Beam scores are sum(log p) / length**length_penalty (the paper's length normalisation)."""
    early_stopping: bool = True
    """Stop a row's beam search once num_beams hypotheses are finished."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size (0: off)."""
    do_sample: bool = False
    """Sample instead of greedy/beam search."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability."""
    seed: int = 0
    """Random seed for sampling."""
    compile: bool = False
    """Run the model under torch.compile (inductor) while decoding: the same tokens, 1.64x fp32
    greedy decoding on an AMX CPU (bf16 1.08x), after minutes of compiling in a process's first
    calls (once per kind of call: prefill, one-token step, a lone row); needs g++ on CPU."""
    fuse_projections: bool = False
    """Run the model's Q/K/V and gate/up projections as one matmul each (Llama-family; the same
    tokens, weights concatenated once, more memory: see docs/PERFORMANCE.md); decoder-only
    models only (an encoder-decoder model is refused)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.max_new_tokens > 100_000:
            raise ConfigError(f"max_new_tokens must be in 1..100000, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GenerateConfig:
        """The paper's settings by name: 'greedy', 'table-to-text', 'summarization'."""
        if name not in GENERATION_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(GENERATION_PRESETS)}")
        return cls(**{**GENERATION_PRESETS[name], **overrides})


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
    "GenerateConfig",
    "PrefixConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
    "load_json",
]
