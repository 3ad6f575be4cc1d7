"""Data-parallel training on CPU (gloo, 2 processes on 127.0.0.1) against one process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, LlamaForCausalLM

from prefixtune.cli.main import main
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.core.artifact import load_encoder, load_prefix
from prefixtune.data.builtin import builtin_examples
from prefixtune.training.distributed import Distributed
from prefixtune.training.trainer import Trainer

from conftest import TOKENIZER_VOCAB, free_port, load_prefix_set, run_ranks, tiny_gpt2, tiny_llama

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    """A tiny Llama (GQA, RoPE) + tokenizer on disk, loaded the same way by every process."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_llama(TOKENIZER_VOCAB).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


class Crash(Exception):
    """Raised in place of an optimizer step to simulate a killed job."""


def make_trainer(model_dir: Path, out: Path, crash_at: int | None = None, **overrides) -> Trainer:
    """21 examples in batches of 5 (the last batch has 1 row: one rank gets none), grad_accum 2,
    dev loss every 3 steps, a checkpoint every 3 steps."""
    values = dict(out=str(out), batch_size=5, grad_accum=2, lr=5e-3, max_steps=6, warmup_steps=2,
                  checkpoint_every=3, eval_every=3, dev_size=0, progress=False, log_every=1,
                  seed=3, autocast="float32", device="cpu", max_source_tokens=48,
                  max_target_tokens=24)  # fmt: skip
    examples = builtin_examples("train")
    trainer = Trainer(
        TrainConfig(**{**values, **overrides}),
        PrefixConfig(length=3, mlp_hidden=16),
        model=LlamaForCausalLM.from_pretrained(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        train_examples=examples[:21],
        dev_examples=examples[21:27],
    )
    if crash_at is not None:
        step = trainer._train_step

        def crashing(index: int) -> tuple[float, int]:
            if index == crash_at:
                raise Crash
            return step(index)

        trainer._train_step = crashing  # type: ignore[method-assign]
    return trainer


def _worker(rank: int, world: int, port: int, model_dir: Path, out: Path, crash_at: int) -> None:
    """One rank: joins the group, then trains until the simulated crash."""
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        trainer = make_trainer(model_dir, out, crash_at=crash_at)
        assert isinstance(trainer.dist, Distributed) and trainer.dist.world == world
        with contextlib.suppress(Crash):
            trainer.fit()
    finally:
        dist.destroy_process_group()


def assert_encoders_close(a: Path, b: Path) -> None:
    left, right = load_encoder(a).state_dict(), load_encoder(b).state_dict()
    assert list(left) == list(right)
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=TOLERANCE, rtol=0, msg=name)


def test_shard_bounds_cover_every_row_once():
    for rows in range(0, 9):
        for world in (1, 2, 3):
            spans = [Distributed(r, world, torch.device("cpu")).bounds(rows) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_two_ranks_match_one_process_and_resume_on_one(tmp_path, llama_dir):
    """2 ranks x 3 steps == 1 process x 3 steps; their checkpoint then resumes on 1 process to
    the same result as 1 process all along."""
    single, double = tmp_path / "single", tmp_path / "double"
    with pytest.raises(Crash):  # 1 process: checkpoint at step 3, killed in step 5
        make_trainer(llama_dir, single, crash_at=4).fit()
    run_ranks(_worker, 2, llama_dir, double, 4)  # 2 ranks, the same
    assert_encoders_close(single / "checkpoint", double / "checkpoint")
    state = torch.load(double / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 3
    lines = [json.loads(line) for line in (double / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # rank 0 alone wrote
    reference = [json.loads(line) for line in (single / "log.jsonl").read_text().splitlines()]
    for ours, theirs in zip(lines, reference, strict=True):  # losses and sharded dev losses
        key = "loss" if "loss" in ours else "dev_loss"
        assert ours[key] == pytest.approx(theirs[key], abs=TOLERANCE)

    make_trainer(llama_dir, single, resume=True).fit()
    make_trainer(llama_dir, double, resume=True).fit()  # world size 1 from a 2-rank checkpoint
    assert_encoders_close(single / "checkpoint", double / "checkpoint")
    torch.testing.assert_close(load_prefix(double / "prefix").kv["self"],
                               load_prefix(single / "prefix").kv["self"], atol=TOLERANCE, rtol=0)  # fmt: skip


def test_torchrun_cli_multitask_matches_one_process(tmp_path, bpe_tokenizer):
    """`torchrun --nproc-per-node 2 -m prefixtune train` with two tasks == `prefixtune train`."""
    model_dir = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    tiny_gpt2(TOKENIZER_VOCAB).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    examples = builtin_examples("train")
    for name, part in (("a", examples[:9]), ("b", examples[9:20])):
        rows = [{"source": e.source, "target": e.target} for e in part]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"a={tmp_path / 'a.jsonl'},b={tmp_path / 'b.jsonl'}"
    args = ["train", "--model", str(model_dir), "--data", data, "--dev-split", "",
            "--max-steps", "3", "--batch-size", "5", "--lr", "0.01", "--no-progress",
            "--autocast", "float32", "--device", "cpu", "--max-source-tokens", "40",
            "--max-target-tokens", "20", "--prefix-length", "3", "--prefix-mlp-hidden", "8",
            "--log-every", "1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
              "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port()), "-m", "prefixtune"]  # fmt: skip
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "double")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (
        load_prefix_set(tmp_path / "single" / "prefixes"),
        load_prefix_set(tmp_path / "double" / "prefixes"),
    )
    assert list(one) == list(two) == ["a", "b"]
    for name in one:
        torch.testing.assert_close(two[name].kv["self"], one[name].kv["self"], atol=TOLERANCE,
                                   rtol=0)  # fmt: skip
    run = json.loads((tmp_path / "double" / "run.json").read_text())
    assert run["world_size"] == 2 and [t["train_examples"] for t in run["tasks"]] == [9, 11]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "double" / "log.jsonl").open()]
    reference = [json.loads(line)["loss"] for line in (tmp_path / "single" / "log.jsonl").open()]
    assert losses == pytest.approx(reference, abs=TOLERANCE)
