"""`prefixtune serve`: many prefixes, one frozen model, mixed batches over HTTP (docs/SERVING.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prefixtune.cli.args import add_dataclass_arguments, dataclass_from_args
from prefixtune.config import ConfigError
from prefixtune.serving.app import ServeConfig, build_server, is_loopback
from prefixtune.serving.lifecycle import DrainingServer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:

    add_dataclass_arguments(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:

    config = dataclass_from_args(ServeConfig, args)  # a public --host needs a token or a flag
    if config.prefixes and not Path(config.prefixes).is_dir():
        raise ConfigError(f"--prefixes {config.prefixes}: not a directory")
    if not is_loopback(config.host) and not config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it may generate",
                    config.host)  # fmt: skip
    server = build_server(config)  # artifacts that do not fit are logged and skipped
    log.info("serving %d prefixes (%s batching) on http://%s:%d", len(server.bank),
             server.scheduler.stats()["mode"], config.host, config.port)  # fmt: skip
    DrainingServer(server, host=config.host, port=config.port, log_level="info").run()
    return 0
