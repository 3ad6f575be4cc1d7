"""`prefixtune <subcommand>`: each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`. Config dataclass fields become flags, with the
fields' docstrings as help."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from prefixtune.cli.args import UserError

# name -> (module, one-line help[, add-arguments function, run function])
COMMANDS: dict[str, tuple[str, ...]] = {
    "train": ("prefixtune.cli.train", "train a prefix (or a baseline) on a dataset"),
    "demo": ("prefixtune.cli.demo", "the quick-start demo: train on E2E, show before/after"),
    "generate": ("prefixtune.cli.evaluate", "generate text for inputs, with or without a prefix",
                 "add_arguments_generate", "run_generate"),
    "evaluate": ("prefixtune.cli.evaluate", "generate on a split, score, write predictions + metrics",
                 "add_arguments_evaluate", "run_evaluate"),
    "serve": ("prefixtune.cli.serve", "serve many prefixes from one model over HTTP"),
    "bench": ("prefixtune.cli.bench", "measure prefixtune against PEFT (speed, memory, MFU)"),
    "bench-serve": ("prefixtune.cli.bench_serve", "serving throughput: mixed batches vs per-prefix"),
    "reproduce": ("prefixtune.cli.reproduce", "the paper's tables and figures at a chosen scale"),
    "export": ("prefixtune.cli.interop", "export a prefix to another format (PEFT)",
               "add_arguments_export", "run_export"),
    "import": ("prefixtune.cli.interop", "import a prefix from another format (PEFT)",
               "add_arguments_import", "run_import"),
    "models": ("prefixtune.cli.models", "model families prefixtune supports, checked (--check)"),
    "plot": ("prefixtune.cli.plot", "draw runs' loss and dev-loss curves (log.jsonl) to a PNG"),
    "score": ("prefixtune.cli.score", "score any system's prediction file against references"),
}  # fmt: skip


def _user_errors() -> tuple[type[BaseException], ...]:
    from prefixtune.config import ConfigError
    from prefixtune.core.artifact import ArtifactError
    from prefixtune.core.models import ModelLoadError

    errors: list[type[BaseException]] = [UserError, ConfigError, ArtifactError, ModelLoadError]
    try:
        from prefixtune.data.records import DataError
    except ImportError:  # pragma: no cover - data module absent
        pass
    else:
        errors.append(DataError)
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixtune",
        description="Prefix-tuning (Li & Liang 2021) for frozen Hugging Face models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, *entry) in COMMANDS.items():
        add_name, run_name = entry or ("add_arguments", "run")
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        getattr(module, add_name)(command)
        command.set_defaults(_run=getattr(module, run_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return int(args._run(args) or 0)
    except _user_errors() as err:
        print(f"prefixtune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
