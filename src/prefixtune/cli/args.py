"""Flags from config dataclasses (each field's docstring is its --help) and the user-error type
every command raises for bad input."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from typing import Any, get_type_hints


class UserError(Exception):
    """Raised by commands for bad input; printed as one line, exit code 2."""


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
