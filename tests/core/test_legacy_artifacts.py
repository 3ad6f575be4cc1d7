"""A run directory written by the previous release (the flat layout, before the package move)
still loads, generates the tokens it generated then, serves, and exports to PEFT.

tests/fixtures/legacy_run/ was made by its make.py with prefixtune at git 2f9d47b; expected.json
holds what that release decoded. Nothing here regenerates it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixtune import FoldedPrefix, load_prefix, prefixed_forward
from prefixtune.config import GenerateConfig
from prefixtune.core.artifact import artifact_dir
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad
from prefixtune.interop.peft import export_peft, import_peft
from prefixtune.serving.bank import PrefixBank
from prefixtune.serving.scheduler import Scheduler

from conftest import tiny_gpt2

RUN = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_run"
EXPECTED = json.loads((RUN / "expected.json").read_text())
GREEDY = GenerateConfig(max_new_tokens=6, num_beams=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_gpt2()


def test_the_old_run_directory_resolves_and_loads():
    assert artifact_dir(RUN) == RUN / "prefix"
    prefix = load_prefix(artifact_dir(RUN))
    assert isinstance(prefix, FoldedPrefix) and prefix.length == 3
    assert prefix.meta["base_model"] == "tiny-gpt2-seed0"


def test_it_decodes_what_the_old_release_decoded(model):
    ids, mask = left_pad(EXPECTED["prompts"], 0)
    with torch.no_grad():
        tokens = generate(model, ids, mask, load_prefix(artifact_dir(RUN)).to_prefix_kv(), GREEDY,
                          eos_token_id=2, pad_token_id=0)  # fmt: skip
        logits = prefixed_forward(
            model, ids, mask, load_prefix(artifact_dir(RUN)).to_prefix_kv()
        ).logits
        plain = prefixed_forward(model, ids, mask, None).logits
    assert tokens == EXPECTED["tokens"]
    want = torch.tensor(EXPECTED["last_logits_first8"])
    torch.testing.assert_close(logits[:, -1, :8], want, rtol=0, atol=1e-5)
    assert (plain[:, -1, :8] - want).abs().max() > 1e-2  # the prefix is what makes them


def test_it_serves_the_same_tokens(model, tmp_path):
    bank = PrefixBank(model)
    bank.load("legacy", RUN)
    scheduler = Scheduler(model, bank, eos_token_id=2, pad_token_id=0, max_wait_ms=50).start()
    try:
        futures = [scheduler.submit(p, "legacy", GREEDY) for p in EXPECTED["prompts"]]
        served = [f.result(timeout=60).tokens for f in futures]
    finally:
        scheduler.close(10)
    assert served == EXPECTED["tokens"]


def test_it_exports_to_peft_and_back_unchanged(model, tmp_path):
    prefix = load_prefix(artifact_dir(RUN))
    export_peft(prefix, tmp_path / "peft", base_model_name_or_path="tiny-gpt2-seed0",
                model_config=model.config)  # fmt: skip
    back = import_peft(tmp_path / "peft", model)
    for kind, tensor in prefix.kv.items():
        assert torch.equal(back.kv[kind], tensor)
