"""The `prefixtune` command line on a tiny model saved to a local directory."""

from __future__ import annotations

import json

import pytest

from prefixtune.cli.main import main
from prefixtune.core.artifact import load_prefix
from prefixtune.data.builtin import builtin_examples


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"source": e.source, "target": e.target} for e in builtin_examples("train")[:12]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_from_flags_and_config_file(tmp_path, model_dir, jsonl, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"train": {"batch_size": 4, "lr": 0.01}, "prefix": {"length": 3}}))
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--data", str(jsonl), "--dev-split", "",
                 "--model", str(model_dir), "--max-steps", "2", "--out", str(out),
                 "--no-progress", "--max-source-tokens", "40", "--max-target-tokens", "20",
                 "--prefix-mlp-hidden", "8"])  # fmt: skip
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["train_config"]["batch_size"] == 4 and run["train_config"]["lr"] == 0.01
    assert run["prefix_config"]["length"] == 3 and run["prefix_config"]["mlp_hidden"] == 8
    assert load_prefix(out / "prefix").length == 3
    assert f"saved: {out}/prefix (artifact)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--prefix-length", "-2"], "prefix length must be a positive integer"),
        (["--data", "nowhere.jsonl"], "nowhere.jsonl"),
        (["--method", "lora"], "--method must be one of"),
        (["--config", "missing.json"], "missing.json: file not found"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, model_dir, tmp_path, capsys):
    base = ["train", "--model", str(model_dir), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "prefix").exists()


def test_the_console_command_resolves_and_every_subcommand_has_help(capsys):
    """`prefixtune` as installed (the console-script entry point), not only `cli.main.main`."""
    from importlib.metadata import entry_points

    from prefixtune.cli.main import COMMANDS

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "prefixtune"]
    assert script.load() is main
    for command in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"usage: prefixtune {command}" in capsys.readouterr().out
