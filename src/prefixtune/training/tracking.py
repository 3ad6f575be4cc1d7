"""Experiment tracking (--report-to): what the trainer appends to log.jsonl, also as scalars.

tensorboard writes event files under OUT/tensorboard/ (`tensorboard --logdir OUT`); every
number of a log record becomes a scalar at the record's step, under the record's key (`loss`,
`lr`, `tokens_per_s`, `dev_loss`, ...; nested dicts as `outer/inner`). Text (e.g. `stopped`)
is kept in log.jsonl only.

The writer opens at the first record, with TensorBoard's purge step set to that record's step:
a resumed run re-logs the steps after its checkpoint, and readers (TensorBoard, its
EventAccumulator) drop the crashed attempt's events from that step on, so no step shows twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefixtune.config import REPORT_TO, ConfigError

TENSORBOARD_DIR = "tensorboard"


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number of a log record but its step; bools and text are left out."""
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, Mapping):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


class Tracker:
    """Mirrors log records to the tracker `report_to` names ("none": does nothing).

    Only the process that writes the run (rank 0) should have an enabled tracker."""

    def __init__(self, report_to: str, out: str | Path, *, enabled: bool = True) -> None:
        if report_to not in REPORT_TO:
            raise ConfigError(
                f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}"
            )
        self.report_to = report_to if enabled else "none"
        self.directory = Path(out) / TENSORBOARD_DIR
        self._writer: Any = None

    def _open(self, first_step: int) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is a dependency; a broken install lands here
            raise ConfigError(
                f"--report-to tensorboard needs the tensorboard package ({err}); "
                "`pip install tensorboard` or use --report-to none"
            ) from None
        return SummaryWriter(log_dir=str(self.directory), purge_step=first_step, flush_secs=10)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write the record's numbers at its step (records without a step are skipped)."""
        step = record.get("step")
        if self.report_to == "none" or not isinstance(step, int):
            return
        if self._writer is None:
            self._writer = self._open(step)
        for tag, value in scalars(record):  # a NaN loss is written as NaN, as log.jsonl has it
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (safe to call twice, and when nothing was logged)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
