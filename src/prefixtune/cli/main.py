"""`prefixtune <subcommand>`: each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`. Config dataclass fields become flags, with the
fields' docstrings as help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import logging
import sys
import textwrap
from functools import cache
from typing import Any, get_type_hints

# name -> (module, one-line help[, add-arguments function, run function])
COMMANDS: dict[str, tuple[str, ...]] = {
    "train": ("prefixtune.cli.train", "train a prefix (or a baseline) on a dataset"),
    "demo": ("prefixtune.cli.demo", "the quick-start demo: train on E2E, show before/after"),
    "generate": ("prefixtune.cli.evaluate", "generate text for inputs, with or without a prefix",
                 "add_arguments_generate", "run_generate"),
    "evaluate": ("prefixtune.cli.evaluate", "generate on a split, score, write predictions + metrics",
                 "add_arguments_evaluate", "run_evaluate"),
    "serve": ("prefixtune.serving.app", "serve many prefixes from one model over HTTP"),
    "bench": ("prefixtune.cli.bench", "measure prefixtune against PEFT (speed, memory, MFU)"),
    "bench-serve": ("prefixtune.bench.serve", "serving throughput: mixed batches vs per-prefix"),
    "reproduce": ("prefixtune.experiments.reproduce", "the paper's tables and figures at a chosen scale"),
    "export": ("prefixtune.interop.peft", "export a prefix to another format (PEFT)",
               "add_arguments_export", "run_export"),
    "import": ("prefixtune.interop.peft", "import a prefix from another format (PEFT)",
               "add_arguments_import", "run_import"),
}  # fmt: skip


class UserError(Exception):
    """Raised by commands for bad input; printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from prefixtune.config import ConfigError
    from prefixtune.core.artifact import ArtifactError
    from prefixtune.core.models import ModelLoadError

    errors: list[type[BaseException]] = [UserError, ConfigError, ArtifactError, ModelLoadError]
    try:
        from prefixtune.data.readers import DataError
    except ImportError:  # pragma: no cover - data module absent
        pass
    else:
        errors.append(DataError)
    return tuple(errors)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--{prefix}{field}` flag per dataclass field; default None means 'keep the default'."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        kind = hints[f.name]
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif str(kind).startswith("tuple"):
            group.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=None, help=help_text)


def dataclass_from_args(
    cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None, prefix: str = ""
):
    """Build `cls` from parsed flags, over `base` values (e.g. from --config), over defaults."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


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
