"""Run generation on a split, score it, and write predictions, references and metrics.

Text lives only here, at the edge: sources become prompt ids (the exact ids training used),
the engine in generate.py returns ids, and they are decoded back to text for the metrics.

Outputs (written atomically into --out, default RUN/eval-SPLIT):
    predictions.txt   one prediction per line, in the order of the grouped split
    references.txt    the references of each item, items separated by a blank line
                      (the official E2E scripts' multi-reference format)
    predictions.jsonl {"input", "prediction", "references"[, "category"]} per item, exact
                      strings (`prefixtune score` reads it as predictions and references)
    metrics.json      scores (see metrics.py for which implementation gives each number)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from prefixtune.config import ConfigError, GenerateConfig
from prefixtune.core.artifact import FoldedPrefix, check_fits, trained_separator
from prefixtune.core.atomic_files import atomic_write_json, atomic_write_text
from prefixtune.core.attention import PrefixKV
from prefixtune.core.limits import check_positions, position_limit
from prefixtune.core.models import is_encoder_decoder, load_model
from prefixtune.core.prefix_encoder import model_shapes
from prefixtune.core.quantize import quantize_base
from prefixtune.data.chat import prompt_messages
from prefixtune.data.chat_encoding import chat_prompt_ids, chat_template_of
from prefixtune.data.encoding import encode_prompt
from prefixtune.data.hf_datasets import FieldMap
from prefixtune.data.readers import load_examples, subsample
from prefixtune.data.records import DATASETS, Example
from prefixtune.evaluation.metrics import score
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import pad_prompts

if TYPE_CHECKING:
    from prefixtune.methods.baselines import Loaded


@dataclass
class Predictor:
    """Text in, text out: a frozen model, its tokenizer and an optional folded prefix, or any
    method's trained artifact (`from_artifact`: prefix, infix, embedding, adapter, ft-top2,
    finetune).

    `separator` (decoder-only prompt format) defaults to the one the artifact was trained with.
    A prefix trained on chat data prompts with its `chat_template` and `system` default (from
    its meta): a conversation as the template renders it, a plain text as one user turn.
    """

    model: Any
    tokenizer: Any
    prefix: FoldedPrefix | None = None
    max_source_tokens: int = 256
    separator: str | None = None
    loaded: Loaded | None = None
    chat_template: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.prefix is not None:
            where = str(self.prefix.meta.get("path", "prefix"))
            check_fits(self.prefix.shapes(), model_shapes(self.model), where)
        meta = self.loaded.meta if self.loaded else self.prefix.meta if self.prefix else {}
        if self.separator is None:
            self.separator = trained_separator(meta)
        if self.chat_template is None and isinstance(meta.get("chat_template"), str):
            self.chat_template = meta["chat_template"]
        if self.system is None:
            self.system = str(meta.get("system") or "")

    @classmethod
    def from_artifact(cls, directory: str | Path, model: Any, tokenizer: Any,
                      max_source_tokens: int = 256, separator: str | None = None) -> Predictor:  # fmt: skip
        """A predictor for whatever `directory` holds (a run's prefix/ of any --method).

        ft-top2 and adapter artifacts load into `model` itself; finetune loads a copy.
        """
        from prefixtune.methods.baselines import load_method_artifact

        loaded = load_method_artifact(directory, model)
        return cls(loaded.model, tokenizer, None, max_source_tokens, separator, loaded)

    def prompt(self, source: str | Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt ids of a source text, or of chat messages (rendered with the generation
        prompt, exactly as the training conversation's turns before its assistant answer)."""
        if isinstance(source, str) and not source.strip():
            raise ConfigError("an input line is empty: give a source text on every line")
        if not isinstance(source, str) or self.chat_template is not None:
            messages = [{"role": "user", "content": source}] if isinstance(source, str) else source
            template = self.chat_template or chat_template_of(self.tokenizer, "a chat prompt")
            return chat_prompt_ids(self.tokenizer, messages, template, self.system or "")
        return encode_prompt(
            source,
            self.tokenizer,
            encoder_decoder=is_encoder_decoder(self.model),
            separator=self.separator,
            max_source_tokens=self.max_source_tokens,
        )

    def _prefix_kv(self, mask: torch.Tensor) -> PrefixKV | None:
        """The batch's prefix; an infix also needs the (B, T) prompt mask to place itself."""
        if self.loaded is not None:
            return self.loaded.prompt_inputs(mask)[0]
        return None if self.prefix is None else self.prefix.to_prefix_kv(self.model.device)

    def _check_positions(self, prompts: list[list[int]], config: GenerateConfig) -> None:
        """Refuse, before generating anything, the longest prompt if it + the prefix + the new
        tokens would run past the model's positions; names the input (1-based)."""
        limit = position_limit(self.model)
        if limit is None or not prompts:
            return
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        one_row = torch.ones(1, 1, dtype=torch.long, device=self.model.device)
        prefix = self._prefix_kv(one_row)
        offset = 0 if prefix is None else int(prefix.row_lengths(1, one_row.device).max())
        check_positions(limit, prefix=offset, tokens=len(prompts[longest]),
                        new_tokens=config.max_new_tokens,
                        what=f"input {longest + 1} of {len(prompts)} (the longest)",
                        hint="lower --max-source-tokens or --max-new-tokens")  # fmt: skip

    def predict(
        self, sources: list, config: GenerateConfig, *, batch_size: int = 16, progress=False
    ) -> list[str]:
        """Generate for every source (a text or chat messages: see `prompt`), longest prompts
        first, batched; outputs in input order."""
        prompts = [self.prompt(s) for s in sources]
        self._check_positions(prompts, config)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generate", disable=not progress, dynamic_ncols=True):
            ids, mask = pad_prompts(self.model, [prompts[i] for i in batch], pad)
            ids, mask = ids.to(self.model.device), mask.to(self.model.device)
            generated = generate(self.model, ids, mask, self._prefix_kv(mask), config,
                                 eos_token_id=eos, pad_token_id=pad)  # fmt: skip
            for index, tokens in zip(batch, generated, strict=True):
                outputs[index] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return outputs


def task_of(dataset: str) -> str:
    """The metric suite for a dataset name (a JSONL file gets the generic BLEU/ROUGE-L)."""
    return dataset if dataset in DATASETS else "generic"


def categories_of(examples: list[Example], dataset: str) -> list[str] | None:
    if dataset != "webnlg":
        return None
    return [e.meta.get("seen", "seen") for e in examples]


def score_examples(
    examples: list[Example], predictions: list[str], dataset: str, bootstrap: int = 0
) -> dict[str, float]:
    references = [list(e.references or (e.target,)) for e in examples]
    return score(task_of(dataset), predictions, references, categories_of(examples, dataset),
                 bootstrap=bootstrap)  # fmt: skip


def read_run(run: Path) -> dict[str, Any]:
    """The run's run.json (what it was trained on and how)."""
    path = run / "run.json"
    if not path.exists():
        raise ConfigError(
            f"{run}: no run.json here (pass a directory written by `prefixtune train`)"
        )
    return json.loads(path.read_text())


def write_outputs(
    out: Path, examples: list[Example], predictions: list[str], metrics: dict
) -> None:
    atomic_write_text(
        out / "predictions.txt", "".join(p.replace("\n", " ") + "\n" for p in predictions)
    )
    groups = ["".join(r + "\n" for r in (e.references or (e.target,))) for e in examples]
    atomic_write_text(out / "references.txt", "\n".join(groups))
    # predictions.jsonl: the exact strings per input (a prediction's newlines kept), with its
    # references and WebNLG category; `prefixtune score` reads it as predictions and references
    rows = [{"input": e.source if e.source or not e.messages else [dict(m) for m in e.messages],
             "prediction": p, "references": list(e.references or (e.target,)),
             **({"category": e.meta["seen"]} if "seen" in e.meta else {})}
            for e, p in zip(examples, predictions, strict=True)]  # fmt: skip
    atomic_write_text(out / "predictions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # fmt: skip
    atomic_write_json(out / "metrics.json", metrics)


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table of the metrics."""
    width = max(len(k) for k in metrics) if metrics else 0
    rows = [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int)]
    return "\n".join(rows)


def evaluate_run(
    run: str | Path,
    split: str,
    *,
    config: GenerateConfig | None = None,
    limit: int = 0,
    batch_size: int = 16,
    bootstrap: int = 1000,
    out: str | Path | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    quantize: str = "none",
) -> dict[str, Any]:
    """Generate on `split` of the run's dataset with its artifact (any method); score and write
    the outputs. A `model` passed in may be changed (ft-top2 weights, adapter hooks).
    `quantize`: int8/int4 weight-only base for a prefix run (core/quantize.py)."""
    run = Path(run)
    info = read_run(run)
    train = info["train_config"]
    if not (run / "prefix").exists() and (run / "prefixes").exists():
        raise ConfigError(
            f"{run} is a multi-task run: evaluate each task's prefix with `prefixtune generate "
            f"--prefix {run / 'prefixes'}/TASK`"
        )
    fields = FieldMap(
        train.get("source_field", "source"),
        train.get("target_field", "target"),
        train.get("messages_field", ""),
    )  # the columns the run trained on
    examples = load_examples(train["data"], split, grouped=True, fields=fields)
    if limit and limit < len(examples):
        examples = subsample(examples, limit, seed=0)
    if model is None:
        model, tokenizer = load_model(train.get("model") or None)
    if quantize != "none":
        quantize_base(model, quantize, train.get("method", "prefix"))
    predictor = Predictor.from_artifact(run / "prefix", model, tokenizer,
                                        train.get("max_source_tokens", 256))  # fmt: skip
    if predictor.loaded and "separator" not in predictor.loaded.meta:  # saved before it was kept
        predictor.separator = train.get("separator", "\n")
    config = config or GenerateConfig.preset("table-to-text")
    sources = [prompt_messages(e.messages) if e.messages else e.source for e in examples]
    predictions = predictor.predict(sources, config, batch_size=batch_size,
                                    progress=progress)  # fmt: skip
    metrics = score_examples(examples, predictions, train["data"], bootstrap=bootstrap)
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    report = {"split": split, "items": len(examples), "metrics": metrics,
              "generation": config.__dict__}  # fmt: skip
    write_outputs(Path(out) if out else run / f"eval-{split}", examples, predictions, report)
    return report
