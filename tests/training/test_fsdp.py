"""The frozen base sharded with FSDP2 over 2 CPU ranks (gloo) against one process."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, LlamaForCausalLM

from prefixtune.bench.common import build_ours, synthetic_batch
from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.core.artifact import load_prefix
from prefixtune.data.builtin import builtin_examples
from prefixtune.methods.objective import target_positions
from prefixtune.training.distributed import Distributed
from prefixtune.training.fsdp import shard_base, shard_for_run
from prefixtune.training.trainer import Trainer

from conftest import TOKENIZER_VOCAB, run_ranks, tiny_llama

TOLERANCE = 1e-5


def frozen_llama_and_method():
    torch.manual_seed(0)
    model = tiny_llama().requires_grad_(False)
    return model, build_ours(model, 4, True, 16, seed=0)


def global_batch() -> dict[str, torch.Tensor]:
    """3 rows (rank 0 gets 2, rank 1 gets 1) with uneven targets: the loss weights differ."""
    batch = synthetic_batch(tiny_llama().config.vocab_size, 3, 10, seed=4)
    batch["labels"][0, :6] = -100
    batch["labels"][2, :3] = -100
    return batch


def count_targets(model):
    return lambda batch: int(target_positions(model, batch["labels"])[1].numel())


def make_trainer(model_dir: Path, out: Path, **overrides) -> Trainer:
    """11 examples in batches of 5: the last batch has 1 row, so one rank has none."""
    examples = builtin_examples("train")
    config = TrainConfig(out=str(out), batch_size=5, max_steps=3, lr=5e-3, eval_every=2,
                         dev_size=0, progress=False, log_every=1, seed=3, autocast="float32",
                         device="cpu", max_source_tokens=48, max_target_tokens=24,
                         **overrides)  # fmt: skip
    return Trainer(config, PrefixConfig(length=3, mlp_hidden=16),
                   model=LlamaForCausalLM.from_pretrained(model_dir),
                   tokenizer=AutoTokenizer.from_pretrained(model_dir),
                   train_examples=examples[:11], dev_examples=examples[21:24])  # fmt: skip


def _worker(rank: int, world: int, port: int, model_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        model, method = frozen_llama_and_method()
        job = Distributed(rank, world, torch.device("cpu"))
        assert shard_base(model, job) == 2 and job.lockstep
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert type(weight).__name__ == "DTensor" and weight.to_local().shape[0] == 16
        part, share = job.shard(global_batch(), count_targets(model))
        (method.loss(part) * share).backward()
        loss = job.all_reduce_grads(list(method.parameters()), float(method.loss(part)) * share)
        grads = [p.grad for p in method.parameters()]
        torch.save({"loss": loss, "grads": grads}, out / f"grads{rank}.pt")
        make_trainer(model_dir, out / "run", shard_base=True).fit()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_sharded_ranks_match_one_process(tmp_path, bpe_tokenizer):
    model_dir = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    tiny_llama(TOKENIZER_VOCAB).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    run_ranks(_worker, 2, model_dir, tmp_path)

    _, method = frozen_llama_and_method()  # one process, the whole batch
    loss = method.loss(global_batch())
    loss.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got["loss"] == pytest.approx(float(loss.detach()), abs=TOLERANCE)
        for mine, want in zip(got["grads"], method.parameters(), strict=True):
            torch.testing.assert_close(mine, want.grad, atol=TOLERANCE, rtol=1e-4)

    single = tmp_path / "single"
    make_trainer(model_dir, single).fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    reference = [json.loads(line) for line in (single / "log.jsonl").open()]
    assert [sorted(r) for r in lines] == [sorted(r) for r in reference]
    for ours, theirs in zip(lines, reference, strict=True):  # train and dev losses
        key = "loss" if "loss" in ours else "dev_loss"
        assert ours[key] == pytest.approx(theirs[key], abs=TOLERANCE)
    torch.testing.assert_close(load_prefix(tmp_path / "run" / "prefix").kv["self"],
                               load_prefix(single / "prefix").kv["self"], atol=TOLERANCE,
                               rtol=0)  # fmt: skip


def test_shard_base_refuses_a_single_process_and_fused_projections():
    model, _ = frozen_llama_and_method()
    with pytest.raises(ConfigError, match="torchrun"):
        shard_for_run(model, None, TrainConfig(shard_base=True))
    job = Distributed(0, 2, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--fuse-projections"):
        shard_for_run(model, job, TrainConfig(shard_base=True, fuse_projections=True))
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="down_proj"):
        shard_base(model, job)


def test_lockstep_gives_a_rank_without_rows_one_row_at_weight_zero():
    batch = synthetic_batch(64, 1, 5)
    job = Distributed(1, 2, torch.device("cpu"))
    part, weight = job.shard(batch, lambda b: int(b["labels"].numel()))
    assert weight == 0.0 and part["input_ids"].shape[0] == 0
    job.lockstep = True
    part, weight = job.shard(batch, lambda b: int(b["labels"].numel()))
    assert weight == 0.0 and torch.equal(part["input_ids"], batch["input_ids"][:1])
