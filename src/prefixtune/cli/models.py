"""`prefixtune models`: which model families prefixtune serves faithfully, checked.

Without arguments, builds a tiny random model of every text causal-LM and seq2seq model type
of the installed transformers and runs the conformance suite on each (a minute or two on one
core), printing family, attention kinds found, status and reason. `--check NAME_OR_DIR` runs the
suite, check by check, on one local model directory or one model type name (a tiny random
model). `--markdown FILE` writes the matrix as the table of docs/MODELS.md.

Exit status: 0 when nothing is silently wrong (every family passes or is refused with its
reason), 1 when a check fails on a model prefixtune accepted, 3 when `--check` was refused.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from prefixtune.cli.args import UserError
from prefixtune.conformance.matrix import Row, check_family, counts, markdown, run_matrix
from prefixtune.conformance.results import Report
from prefixtune.conformance.suite import run_suite
from prefixtune.conformance.tiny import families
from prefixtune.core.atomic_files import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`prefixtune models [--check NAME_OR_DIR] [--family NAME ...] [--markdown FILE]`."""
    parser.add_argument(
        "--check", metavar="NAME_OR_DIR", default=None,
        help="run the conformance suite on a local model directory or a model type name "
        "(e.g. llama: a tiny random model)",
    )  # fmt: skip
    parser.add_argument(
        "--family", metavar="NAME", action="append", default=None,
        help="only these model types in the matrix (repeatable; default: every family)",
    )  # fmt: skip
    parser.add_argument("--markdown", metavar="FILE", default=None,
                        help="also write the matrix as a markdown table to FILE")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if not (args.check and Path(args.check).is_dir()):
        torch.set_num_threads(1)  # tiny models gain nothing from threads (one core, as stated)
    if args.check:
        return _check(args.check)
    known = families()
    unknown = [name for name in args.family or [] if name not in known]
    if unknown:
        raise UserError(f"--family: unknown model types {unknown} (see `prefixtune models`)")
    print(f"{'family':26} {'kind':8} {'attention kinds':34} {'status':15} reason")
    rows = run_matrix(args.family, progress=_print_row)
    total = counts(rows)
    print(", ".join(f"{n} {status}" for status, n in total.items()) + f" ({len(rows)} families)")
    if args.markdown:
        command = shlex.join(["prefixtune", "models", *sys.argv[2:]])
        _write_keeping_notes(Path(args.markdown), markdown(rows, command))
        print(f"wrote {args.markdown}")
    return 1 if total["failing"] else 0


KEPT = "<!-- kept when the matrix is regenerated -->"


def _write_keeping_notes(path: Path, table: str) -> None:
    """Write the generated matrix; what an earlier file held after the KEPT marker (sections
    written by hand or by other tools, e.g. the PEFT comparison) stays."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = old[old.index(KEPT) :] if KEPT in old else ""
    atomic_write_text(path, table.rstrip("\n") + "\n\n" + (kept or KEPT + "\n"))


def _print_row(row: Row) -> None:
    print(f"{row.family:26} {row.kind:8} {row.kinds[:34]:34} {row.status:15} {row.reason}",
          flush=True)  # fmt: skip


def _check(target: str) -> int:
    """The suite on one model directory or model type, check by check."""
    path = Path(target)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--check {target}: no config.json in that directory")
        from prefixtune.core.models import load_model

        model, _ = load_model(str(path))
        report = run_suite(model, family=str(path))
    elif target in families():
        row, report = check_family(target)
        if report is None:
            print(f"{target}: {row.status}: {row.reason}")
            return 0 if row.status == "skipped" else 1
    else:
        raise UserError(
            f"--check {target}: neither a model directory nor a model type of transformers "
            "(see `prefixtune models` for the families)"
        )
    _print_report(report)
    return {"pass": 0, "refused": 3}.get(report.status, 1)


def _print_report(report: Report) -> None:
    kinds = ", ".join(f"{kind} x{n}" for kind, n in report.kinds.items()) or "none"
    print(f"{report.family}: {report.status} ({report.seconds:.1f}s; attention kinds: {kinds})")
    if report.status == "refused":
        print(f"  refused: {report.reason}")
    for check in report.checks:
        measured = "" if check.error is None else f" {check.error:.1e} <= {check.tolerance:.0e}"
        print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}{measured}: {check.note}")
