"""Runs of an experiment: in this process, in spawned worker processes, or as Ray tasks.

Every executor calls runs.run_one, which skips a run whose result file exists and resumes an
interrupted training from its checkpoint, so any executor can finish what another began.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.experiments.grid import RunSpec
from prefixtune.experiments.runs import Context, run_one

EXECUTORS = ("processes", "ray")


def _threads(jobs: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // jobs)  # the cores this process may use


def run_all(grid: list[RunSpec], ctx: Context, jobs: int = 1, executor: str = "processes",
            ) -> list[dict[str, Any]]:  # fmt: skip
    """Every run of `grid`; rows come back in grid order. A failed run stops new ones from
    starting; those already running finish (and keep their result files), then it is raised."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {EXECUTORS}, got {executor!r}")
    if not grid:
        return []
    if executor == "ray":
        return run_ray(grid, ctx, jobs)
    if jobs == 1:
        rows = []
        for index, spec in enumerate(grid, 1):
            print(f"[{index}/{len(grid)}] {spec.name}", flush=True)
            rows.append(run_one(spec, ctx))
        return rows
    return run_parallel(grid, ctx, jobs)


def run_parallel(grid: list[RunSpec], ctx: Context, jobs: int) -> list[dict[str, Any]]:
    """`jobs` spawned processes with cores/jobs torch threads each."""
    jobs = min(jobs, len(grid))
    rows: dict[str, dict[str, Any]] = {}
    setup = (_threads(jobs), logging.getLogger().getEffectiveLevel())
    with ProcessPoolExecutor(
        jobs, get_context("spawn"), initializer=_set_up_worker, initargs=setup
    ) as pool:  # fmt: skip  (torch and fork do not mix)
        futures = {pool.submit(run_one, spec, ctx): spec.name for spec in grid}
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


def _ray_task(spec: RunSpec, ctx: Context, threads: int) -> dict[str, Any]:
    _set_up_worker(threads, logging.INFO)
    return run_one(spec, ctx)


def run_ray(grid: list[RunSpec], ctx: Context, jobs: int) -> list[dict[str, Any]]:
    """Each run a Ray task of one CPU. Joins a running Ray (ray.init(address=...) done by the
    caller, or RAY_ADDRESS) or starts a local instance of `jobs` CPUs without a dashboard."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
    threads = _threads(jobs) if not os.environ.get("RAY_ADDRESS") else 1
    task = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
    refs = {task.remote(spec, ctx, threads): spec.name for spec in grid}
    rows: dict[str, dict[str, Any]] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            rows[refs[ready[0]]] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as error:
            for ref in pending:
                ray.cancel(ref)
            raise error.as_instanceof_cause() from None
        print(f"[{len(rows)}/{len(grid)}] {refs[ready[0]]} done", flush=True)
    return [rows[spec.name] for spec in grid]
