"""Train a prefix (or a baseline method) on a dataset.

Every TrainConfig field is a flag; prefix settings are --prefix-*. A JSON file given with
--config ({"train": {...}, "prefix": {...}}) sets values that flags then override. Example:

    prefixtune train --data e2e --prefix-length 10 --epochs 5 --out runs/e2e
"""

from __future__ import annotations

import argparse
import json

from prefixtune.cli.args import UserError, add_dataclass_arguments, dataclass_from_args
from prefixtune.config import PrefixConfig, TrainConfig, load_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help='JSON file: {"train": {...}, "prefix": {...}} (flags override it)'
    )
    add_dataclass_arguments(parser, TrainConfig)
    add_dataclass_arguments(parser, PrefixConfig, prefix="prefix_")


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, PrefixConfig]:
    """TrainConfig and PrefixConfig from --config and the flags (flags win)."""
    base = load_json(args.config) if args.config else {}
    unknown = sorted(set(base) - {"train", "prefix"})
    if unknown:
        raise UserError(f"{args.config}: unknown section(s) {unknown}; use 'train' and 'prefix'")
    train = dataclass_from_args(TrainConfig, args, base.get("train"))
    prefix = dataclass_from_args(PrefixConfig, args, base.get("prefix"), prefix="prefix_")
    return train, prefix


def run(args: argparse.Namespace) -> int:
    from prefixtune.training.trainer import train  # heavy imports only when the command runs

    config, prefix = configs_from_args(args)
    summary = train(config, prefix)
    keys = ("initial_dev_loss", "final_dev_loss", "best_dev_loss", "trainable_parameters",
            "trainable_share", "tokens_per_second", "seconds")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"saved: {config.out}/{summary['artifact']} (artifact), {config.out}/run.json")
    return 0
