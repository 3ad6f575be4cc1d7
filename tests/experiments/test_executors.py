"""The Ray executor: each run a task on a local Ray instance, finished runs skipped."""

from __future__ import annotations

import json

import pytest

from prefixtune.config import ConfigError
from prefixtune.data.records import data_dir
from prefixtune.experiments.grid import length_grid
from prefixtune.experiments.runner import run_all
from prefixtune.experiments.runs import Context
from prefixtune.experiments.scales import SCALES
from prefixtune.experiments.tuning import tuning_runs

needs_data = pytest.mark.skipif(not (data_dir() / "e2e").exists(), reason="no E2E data dir")


def test_an_unknown_executor_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--executor must be one of"):
        run_all([], Context(tmp_path, tmp_path, "tiny"), executor="dask")


@pytest.mark.slow
@needs_data
def test_ray_runs_each_run_as_a_task_and_skips_finished_ones(model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    scale = SCALES["tiny"]
    grid = tuning_runs(length_grid(scale), scale)[:2]
    ctx = Context(tmp_path / "runs", tmp_path / "out", "tiny", str(model_dir))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_all(grid, ctx, jobs=2, executor="ray")
        assert [r["run"] for r in rows] == [s.name for s in grid]  # grid order
        files = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "tune").glob("*")}
        assert set(files) == {s.name for s in grid} and all(r["dev_loss"] > 0 for r in rows)
        stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "tune").glob("*")}
        again = run_all(grid, ctx, jobs=2, executor="ray")  # finished: read, not redone
        assert again == rows
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    finally:
        ray.shutdown()
