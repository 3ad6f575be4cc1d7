"""The README's Python API example runs as written (real SmolLM2 weights: slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "api-demo" / "prefix.safetensors").exists()
    assert namespace["logits"].shape[-1] == namespace["model"].config.vocab_size
