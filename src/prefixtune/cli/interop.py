"""`prefixtune export` and `prefixtune import`: prefixes to and from PEFT's format."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from prefixtune.core.artifact import PREFIX_JSON, check_fits, load_prefix, save_prefix
from prefixtune.core.models import load_model, model_id
from prefixtune.core.prefix_encoder import model_shapes
from prefixtune.interop.model_card import card_base, find_prefix_dir, run_info, write_model_card
from prefixtune.interop.peft import export_peft, import_peft, publish_dir, read_peft_config

log = logging.getLogger(__name__)


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
    info = run_info(source)
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
        card_base_model=card_base(name, model),
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
    read_peft_config(Path(args.source))  # fail fast, before loading the model
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
            base_model=card_base(args.model, model),
            task="",
            data="",
            metrics=None,
            command=shlex.join(command),
            separator=args.separator,
        )

    out = publish_dir(args.out, build, overwrite=args.force, marker=PREFIX_JSON)
    print(f"wrote folded prefix to {out}")
    return 0
