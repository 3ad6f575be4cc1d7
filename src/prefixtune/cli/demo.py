"""The quick-start demo: train a prefix on E2E with the embedded default model, then show dev
loss, BLEU and ROUGE-L before and after training and a few outputs beside their references.

Uses the real E2E data when the data directory exists (PREFIXTUNE_DATA, default
../shared/data), else a small built-in restaurant data set. Sized to finish in about ten
minutes on two CPU cores; --steps / --train-size scale it.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

from prefixtune.config import GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.artifact import FoldedPrefix
from prefixtune.data.readers import load_examples, subsample
from prefixtune.data.records import data_dir
from prefixtune.evaluation.predictor import Predictor, score_examples
from prefixtune.training.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="base model (default: embedded SmolLM2-135M)")
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (default: 120)")
    parser.add_argument("--train-size", type=int, default=1200, help="training examples")
    parser.add_argument("--eval-size", type=int, default=40, help="dev inputs scored before/after")
    parser.add_argument("--show", type=int, default=3, help="examples printed side by side")


def _dataset() -> str:
    return "e2e" if (data_dir() / "e2e").exists() else "builtin"


def _scores(predictor: Predictor, examples, dataset: str) -> tuple[list[str], dict[str, float]]:
    config = GenerateConfig(max_new_tokens=48)  # greedy: fast enough for a demo
    predictions = predictor.predict([e.source for e in examples], config, batch_size=20)
    scores = score_examples(examples, predictions, "generic" if dataset == "builtin" else dataset)
    return predictions, scores


def _print_side_by_side(examples, before: list[str], after: list[str], count: int) -> None:
    wrap = textwrap.TextWrapper(width=96, initial_indent="    ", subsequent_indent="    ")
    for example, old, new in list(zip(examples, before, after, strict=True))[:count]:
        print(f"\n  input:     {example.source}")
        for label, text in (("before", old), ("after", new), ("reference", example.target)):
            print(f"  {label}:", *wrap.wrap(text or "(empty)"), sep="\n")


def run(args: argparse.Namespace) -> int:
    dataset = _dataset()
    print(
        f"data: {dataset} ({'real E2E from ' + str(data_dir()) if dataset == 'e2e' else 'built-in'})"
    )
    config = TrainConfig(data=dataset, model=args.model, out=args.out, max_steps=args.steps,
                         train_size=args.train_size, dev_size=100, batch_size=8, lr=5e-4,
                         warmup_steps=10, max_source_tokens=96, max_target_tokens=64,
                         checkpoint_every=50, resume=True)  # fmt: skip
    prefix = PrefixConfig(length=10, init="words", init_text="table-to-text:")
    trainer = Trainer(config, prefix)
    dev = load_examples(dataset, "dev", grouped=True)
    dev = subsample(dev, min(args.eval_size, len(dev)), seed=0)
    model, tokenizer = trainer.model, trainer.tokenizer
    initial = FoldedPrefix(trainer.method.encoder.bake())
    before, before_scores = _scores(
        Predictor(model, tokenizer, initial, 96, config.separator), dev, dataset
    )
    started = time.perf_counter()
    summary = trainer.fit()
    trained = FoldedPrefix(trainer.method.encoder.bake())
    after, after_scores = _scores(
        Predictor(model, tokenizer, trained, 96, config.separator), dev, dataset
    )
    print(f"\ntrained {summary['steps']} steps in {time.perf_counter() - started:.0f} s "
          f"({summary['tokens_per_second']:.0f} tokens/s); prefix: {prefix.length} positions, "
          f"{summary['trainable_parameters']:,} trainable parameters (MLP included)")  # fmt: skip
    print(f"\n{'':<16}{'before':>10}{'after':>10}")
    print(f"{'dev loss':<16}{summary['initial_dev_loss']:>10.3f}{summary['final_dev_loss']:>10.3f}")
    for key in ("BLEU", "ROUGE_L"):
        print(f"{key + ' (dev)':<16}{before_scores[key]:>10.2f}{after_scores[key]:>10.2f}")
    print(
        f"(BLEU/ROUGE-L on {len(dev)} dev inputs, greedy decoding; 'before' = the real-word init)"
    )
    _print_side_by_side(dev, before, after, args.show)
    print(f"\nprefix saved in {Path(args.out) / 'prefix'}; evaluate it with\n"
          f"  prefixtune evaluate --run {args.out} --split test")  # fmt: skip
    return 0
