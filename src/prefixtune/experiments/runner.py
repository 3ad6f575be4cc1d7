"""Runs of an experiment grid, one after another or in parallel worker processes."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from prefixtune.experiments.grid import (
    RunSpec,
    run_one,
)


def run_parallel(grid: list[RunSpec], root: Path, scale: dict[str, Any], model: str,
                 jobs: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every run of `grid` in `jobs` spawned processes; rows come back in grid order.

    A failed run stops new ones from starting; those already running finish (and keep their
    result.json), then the first error is raised.
    """
    jobs = min(jobs, len(grid))
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)  # the cores this process may use
    rows: dict[str, dict[str, Any]] = {}
    context = get_context("spawn")  # torch and fork do not mix
    setup = (threads, logging.getLogger().getEffectiveLevel())
    with ProcessPoolExecutor(jobs, context, initializer=_set_up_worker, initargs=setup) as pool:
        futures = {pool.submit(run_one, spec, root, scale, model): spec.name for spec in grid}
        for done, future in enumerate(as_completed(futures), 1):
            if future.exception() is not None:
                pool.shutdown(cancel_futures=True)
                raise future.exception()
            rows[futures[future]] = future.result()
            print(f"[{done}/{len(grid)}] {futures[future]} done", flush=True)
    return [rows[spec.name] for spec in grid]


def _set_up_worker(threads: int, log_level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(levelname)s %(message)s")
