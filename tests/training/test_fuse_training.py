"""Training with --fuse-projections: the same run as unfused; methods that train base weights
are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from prefixtune.config import ConfigError, PrefixConfig, TrainConfig
from prefixtune.core.fuse import fused_groups
from prefixtune.data.builtin import builtin_examples
from prefixtune.training.trainer import Trainer

from conftest import TOKENIZER_VOCAB, tiny_llama


def trainer(tmp_path, model, tokenizer, **overrides) -> Trainer:
    config = TrainConfig(out=str(tmp_path), batch_size=4, max_steps=3, lr=5e-3, dev_split="",
                         progress=False, autocast="float32", device="cpu", max_source_tokens=32,
                         max_target_tokens=16, **overrides)  # fmt: skip
    examples = builtin_examples("train")[:12]
    return Trainer(config, PrefixConfig(length=3, mlp_hidden=16), model=model,
                   tokenizer=tokenizer, train_examples=examples, dev_examples=[])  # fmt: skip


def test_fused_training_matches_unfused(tmp_path, bpe_tokenizer):
    torch.manual_seed(0)
    base = tiny_llama(TOKENIZER_VOCAB)
    runs = []
    for fuse in (False, True):
        run = trainer(tmp_path / str(fuse), copy.deepcopy(base), bpe_tokenizer,
                      fuse_projections=fuse)  # fmt: skip
        assert len(fused_groups(run.model)) == (4 if fuse else 0)
        losses = [run._train_step(step)[0] for step in range(3)]
        runs.append((losses, [p.detach().clone() for p in run.method.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_b == pytest.approx(losses_a, abs=1e-5)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_method_that_trains_base_weights_is_refused(tmp_path, bpe_tokenizer):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="--fuse-projections"):
        trainer(tmp_path, tiny_llama(TOKENIZER_VOCAB), bpe_tokenizer, method="finetune",
                fuse_projections=True)  # fmt: skip
