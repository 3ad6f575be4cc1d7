"""`prefixtune evaluate` and `prefixtune generate`: decoding flags come from GenerateConfig;
--preset picks the paper's settings (table-to-text: beam 5; summarization: beam 6, length
normalisation 0.8) and explicit flags override it.

    prefixtune evaluate --run runs/e2e --split test
    prefixtune generate --prefix runs/e2e --input "name : The Eagle | food : French"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefixtune.cli.args import UserError, add_dataclass_arguments
from prefixtune.config import GENERATION_PRESETS, QUANTIZE_MODES, GenerateConfig


def _add_decoding(parser: argparse.ArgumentParser, default_preset: str) -> None:
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items())
                        for name, values in sorted(GENERATION_PRESETS.items()))  # fmt: skip
    parser.add_argument("--preset", default=default_preset, choices=sorted(GENERATION_PRESETS),
                        help=f"decoding preset, which explicit flags override ({presets}) "
                             f"(default: {default_preset})")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per generation batch")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=list(QUANTIZE_MODES),
        help="frozen base weights: int8 (or int4 where torchao has a kernel) "
        "weight-only linear layers, for prefix artifacts (default: none)",
    )
    add_dataclass_arguments(parser, GenerateConfig)
    _state_preset_defaults(parser, default_preset)


def _state_preset_defaults(parser: argparse.ArgumentParser, preset: str) -> None:
    """Help texts give the value a flag left out really takes: the default preset's where it
    sets the field (GenerateConfig's own default is shown otherwise)."""
    values = GENERATION_PRESETS[preset]
    for action in parser._actions:  # argparse has no public way to edit a help text
        if action.dest in values and action.help:
            text = action.help.rsplit(" (default: ", 1)[0]
            action.help = f"{text} (default: {values[action.dest]!r}, from --preset {preset})"


def _generate_config(args: argparse.Namespace) -> GenerateConfig:
    import dataclasses

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateConfig)
                 if getattr(args, f.name) is not None}  # fmt: skip
    return GenerateConfig.preset(args.preset, **overrides)


def add_arguments_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, help="a run directory written by `prefixtune train`"
    )
    parser.add_argument(
        "--split", default="test", help="split of the run's dataset (default: test)"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="score a fixed subset of N items (0: all)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the BLEU 95%% confidence interval (0: off)",
    )
    parser.add_argument("--out", help="output directory (default: RUN/eval-SPLIT)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_decoding(parser, "table-to-text")


def run_evaluate(args: argparse.Namespace) -> int:
    from prefixtune.evaluation.predictor import evaluate_run, format_table

    report = evaluate_run(args.run, args.split, config=_generate_config(args), limit=args.limit,
                          batch_size=args.batch_size, bootstrap=args.bootstrap, out=args.out,
                          progress=not args.no_progress, quantize=args.quantize)  # fmt: skip
    print(format_table(report["metrics"]))
    print(
        f"wrote predictions.txt, predictions.jsonl, references.txt, metrics.json to {args.out or Path(args.run) / ('eval-' + args.split)}"
    )
    return 0


def add_arguments_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", help="a run directory or a trained artifact of any method "
                        "(prefix, infix, embedding, adapter, ft-top2, finetune; omit: none)")  # fmt: skip
    parser.add_argument(
        "--model", help="base model (default: the run's, else the embedded default)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", action="append",
                        help="a source text (repeatable); a prefix trained on chat data reads "
                             "it as one user turn, in its chat template")  # fmt: skip
    source.add_argument("--file", help="a file with one source per line ('-' for stdin)")
    parser.add_argument("--max-source-tokens", type=int, default=256, help="truncate sources")
    parser.add_argument(
        "--separator",
        help="text between source and output in a decoder-only prompt "
        "(default: the one the prefix was trained with, else a newline)",
    )
    _add_decoding(parser, "greedy")


def _read_sources(args: argparse.Namespace) -> list[str]:
    if args.input:
        return args.input
    if args.file and args.file != "-":
        path = Path(args.file)
        if not path.exists():
            raise UserError(f"--file {path}: not found")
        lines = path.read_text().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            name = "stdin" if args.file in (None, "-") else args.file
            raise UserError(f"{name}:{number}: empty input line")
    return lines


def _artifact_and_model(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """The artifact directory (a run's prefix/ or the directory given) and the model to load."""
    if not args.prefix:
        return None, args.model
    path = Path(args.prefix)
    run_json = path / "run.json"
    if not run_json.exists():
        return path, args.model
    model = args.model or json.loads(run_json.read_text())["train_config"].get("model")
    return path / "prefix", model


def _artifact_method(artifact: Path | None) -> str:
    """The --method that trained `artifact` (its method.json or prefix.json): what
    quantize_base checks, as evaluate_run does with the run's; 'prefix' for none."""
    from prefixtune.core.artifact import PREFIX_JSON
    from prefixtune.methods.baselines import METHOD_JSON

    for meta in (artifact / METHOD_JSON, artifact / PREFIX_JSON) if artifact else ():
        if meta.is_file():
            return json.loads(meta.read_text()).get("method", "prefix")
    return "prefix"


def run_generate(args: argparse.Namespace) -> int:
    from prefixtune.core.models import load_model
    from prefixtune.core.quantize import check_mode, quantize_base
    from prefixtune.evaluation.predictor import Predictor

    sources = _read_sources(args)
    config = _generate_config(args)
    artifact, model_name = _artifact_and_model(args)
    check_mode(args.quantize)  # refused before the model loads
    model, tokenizer = load_model(model_name or None)
    quantize_base(model, args.quantize, _artifact_method(artifact))
    if artifact is None:
        predictor = Predictor(model, tokenizer, None, args.max_source_tokens, args.separator)
    else:
        predictor = Predictor.from_artifact(artifact, model, tokenizer, args.max_source_tokens,
                                            args.separator)  # fmt: skip
    for line in predictor.predict(sources, config, batch_size=args.batch_size):
        print(line)
    return 0
