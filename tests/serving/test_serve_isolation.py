"""Serving isolation: one request's hostile options, broken prefix, cancellation or long beam
search never hurts the other requests (scheduler.py, continuous.py, beam_group.py).

Tiny random GPT-2 and BART with a bank of random prefixes, one of them overwritten with NaN
after loading; every result is compared with the same request run alone through generate().
Waits are bounded; progress is asserted in decode steps, not seconds."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError, Future

import pytest
import torch

from prefixtune.config import GenerateConfig
from prefixtune.core.artifact import save_prefix
from prefixtune.core.prefix_encoder import model_shapes
from prefixtune.generation.engine import generate
from prefixtune.generation.sampling import pick_tokens
from prefixtune.serving.bank import PrefixBank
from prefixtune.serving.requests import RequestFailed
from prefixtune.serving.scheduler import Scheduler

from conftest import TOKENIZER_VOCAB, tiny_bart, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

PAD = 0
NO_EOS = [TOKENIZER_VOCAB + 7]  # an id no model here can produce: rows run to max_new_tokens
GREEDY = GenerateConfig(max_new_tokens=8)
SAMPLE = GenerateConfig(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9, seed=3)


def prompt(i: int) -> list[int]:
    return [1, 5 + i, 17, 40 + 3 * i, 9]


def make_bank(model, root) -> PrefixBank:
    """p0, p1, p2 random; 'nan' a prefix whose values became NaN after a valid load."""
    for i, length in enumerate((2, 3, 1, 2)):
        kv = {kind: torch.randn(s.layers, 2, s.heads, length, s.head_dim) * 2.0
              for kind, s in model_shapes(model).items()}  # fmt: skip
        save_prefix(root / f"p{i}", kv, base_model="tiny")
    bank = PrefixBank(model)
    assert bank.load_dir(root) == {}
    bank.load("nan", root / "p3")
    for tensor in bank.get("nan").kv.values():
        tensor.fill_(float("nan"))
    return bank


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_gpt2(TOKENIZER_VOCAB)
    return model, make_bank(model, tmp_path_factory.mktemp("gpt2-prefixes"))


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_bart(TOKENIZER_VOCAB)
    return model, make_bank(model, tmp_path_factory.mktemp("bart-prefixes"))


def alone(model, bank, tokens, prefix_id, config, eos=NO_EOS) -> list[int]:
    """The request run by itself through generate()."""
    ids = torch.tensor([tokens])
    prefix = bank.gather([prefix_id])
    return generate(model, ids, torch.ones_like(ids), prefix, config, eos_token_id=eos,
                    pad_token_id=PAD)[0]  # fmt: skip


def scheduler(model, bank, **options) -> Scheduler:
    defaults = dict(eos_token_id=NO_EOS, pad_token_id=PAD, max_batch_size=8, max_wait_ms=0)
    return Scheduler(model, bank, **{**defaults, **options}).start()


def wait_for(predicate, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the scheduler"
        time.sleep(0.001)


# ---------------------------------------------------------------------------- sampling maths
def test_pick_tokens_survives_tiny_temperature_tiny_top_p_and_broken_rows():
    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 3
    logits[1, 7] = float("nan")  # a broken row
    logits[2] = float("-inf")  # every token banned
    greedy = logits[0].argmax().item()
    for hostile in (dict(temperature=1e-300), dict(top_p=1e-300), dict(temperature=1e-30,
                                                                      top_p=1e-30)):  # fmt: skip
        config = GenerateConfig(do_sample=True, **hostile)
        tokens = pick_tokens(logits, config, torch.Generator().manual_seed(0))
        assert tokens[0].item() == greedy  # the limit of sampling: greedy decoding
    config = GenerateConfig(do_sample=True, temperature=1.3, top_p=0.9)
    tokens = pick_tokens(logits, config, torch.Generator().manual_seed(4))
    first = pick_tokens(logits[:1], config, torch.Generator().manual_seed(4))
    assert tokens[0] == first[0]  # the healthy row draws as it would alone
    assert 0 <= tokens[1] < 50 and 0 <= tokens[2] < 50


# ---------------------------------------------------------------------------- per-row failure
def test_hostile_rows_fail_alone_in_a_continuous_batch(gpt2):
    """Normal rows equal their solo runs; tiny temperature/top_p rows decode greedily; rows on
    a NaN prefix fail with RequestFailed; all in ONE running batch."""
    model, bank = gpt2
    jobs = [
        ("p0", GREEDY, "same"),
        ("p1", SAMPLE, "same"),
        (None, GenerateConfig(max_new_tokens=8, do_sample=True, temperature=1e-300), "greedy"),
        ("p2", GenerateConfig(max_new_tokens=8, do_sample=True, top_p=1e-300), "greedy"),
        ("nan", SAMPLE, "fail"),
        ("nan", GREEDY, "fail"),
        (None, SAMPLE, "same"),
    ]
    sched = scheduler(model, bank, max_batch_size=len(jobs), max_wait_ms=5000)
    try:
        futures = [sched.submit(prompt(i), p, c) for i, (p, c, _) in enumerate(jobs)]
        for i, ((prefix_id, config, expect), future) in enumerate(zip(jobs, futures, strict=True)):
            if expect == "fail":
                with pytest.raises(RequestFailed, match="non-finite"):
                    future.result(timeout=30)
                continue
            result = future.result(timeout=30)
            assert result.batch_rows == len(jobs)
            solo = config if expect == "same" else GREEDY
            assert result.tokens == alone(model, bank, prompt(i), prefix_id, solo)
        assert sched.stats()["failed"] == 2
    finally:
        assert sched.close(10)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_nan_prefix_fails_only_its_own_request_in_a_group(bart, beams):
    """Request-level groups (BART; beam search) fail only the broken input; the others equal
    their solo generate() runs."""
    model, bank = bart
    config = GenerateConfig(max_new_tokens=6, num_beams=beams)
    tenants = ["p0", "nan", "p1", None]
    sched = scheduler(model, bank, max_batch_size=4, max_wait_ms=5000)
    try:
        futures = [sched.submit(prompt(i), t, config) for i, t in enumerate(tenants)]
        with pytest.raises(RequestFailed, match="non-finite"):
            futures[1].result(timeout=30)
        for i in (0, 2, 3):
            result = futures[i].result(timeout=30)
            assert result.batch_rows == len(tenants)
            assert result.tokens == alone(model, bank, prompt(i), tenants[i], config)
    finally:
        assert sched.close(10)


# ---------------------------------------------------------------------------- cancellation
def test_cancelled_rows_leave_the_running_batch(gpt2):
    """16 long requests (7 decoding beside a survivor, 9 waiting) abandoned: a short request
    sent next is served in about its own number of decode steps, not after the long ones' 100,
    and the survivor's tokens are those of its solo run."""
    model, bank = gpt2
    long, kept = GenerateConfig(max_new_tokens=100), GenerateConfig(max_new_tokens=60)
    sched = scheduler(model, bank, max_batch_size=8)
    try:
        survivor = sched.submit(prompt(30), "p2", kept)
        abandoned = [sched.submit(prompt(i), f"p{i % 3}", long) for i in range(16)]
        wait_for(lambda: sched.stats()["running"] == 8)
        steps_before = sched.stats()["decode_steps"]
        assert all(sched.cancel(f) for f in abandoned)
        seen: dict[str, int] = {}
        short = sched.submit(prompt(20), "p1", GREEDY)
        short.add_done_callback(lambda _: seen.update(steps=sched.stats()["decode_steps"]))
        assert short.result(timeout=30).tokens == alone(model, bank, prompt(20), "p1", GREEDY)
        assert seen["steps"] - steps_before <= GREEDY.max_new_tokens + 10  # not 100
        for future in abandoned:
            with pytest.raises(CancelledError):
                future.result(timeout=30)
        assert survivor.result(timeout=30).tokens == alone(model, bank, prompt(30), "p2", kept)
        stats = sched.stats()
        assert stats["cancelled"] == 16 and stats["failed"] == 0
        assert not sched.cancel(short)  # already answered
        assert not sched.cancel(Future())  # never submitted
    finally:
        assert sched.close(10)


def test_cancelled_beam_group_stops_and_waiting_group_is_skipped(gpt2):
    model, bank = gpt2
    beam = GenerateConfig(max_new_tokens=100, num_beams=4)
    other = GenerateConfig(max_new_tokens=100, num_beams=2)  # another group: waits its turn
    sched = scheduler(model, bank)
    try:
        running = sched.submit(prompt(0), "p0", beam)
        wait_for(lambda: sched.stats()["groups"] == 1)
        waiting = sched.submit(prompt(1), "p1", other)
        assert sched.cancel(waiting) and waiting.cancelled()
        assert sched.cancel(running)
        with pytest.raises(CancelledError):
            running.result(timeout=30)
        wait_for(lambda: sched.stats()["groups"] == 0)
        assert sched.stats()["group_steps"] < 20
        assert sched.stats()["cancelled"] == 2
    finally:
        assert sched.close(10)


# ---------------------------------------------------------------------------- fairness
def test_a_long_beam_search_does_not_stall_greedy_requests(gpt2):
    """A greedy request sent while a 4-beam 100-token search runs is answered after about its
    own 8 decode steps (beam steps interleave with continuous ones); the beam result is
    generate()'s."""
    model, bank = gpt2
    beam = GenerateConfig(max_new_tokens=100, num_beams=4)
    sched = scheduler(model, bank)
    try:
        slow = sched.submit(prompt(0), "p0", beam)
        wait_for(lambda: sched.stats()["waiting"] == 0)  # the beam search has started
        seen: dict[str, int] = {}
        submitted_at = sched.stats().get("group_steps", 0)
        fast = sched.submit(prompt(1), "p2", GREEDY)
        fast.add_done_callback(lambda _: seen.update(steps=sched.stats().get("group_steps", 0),
                                                     beam_done=slow.done()))  # fmt: skip
        assert fast.result(timeout=30).tokens == alone(model, bank, prompt(1), "p2", GREEDY)
        assert not seen["beam_done"]
        assert seen["steps"] - submitted_at <= GREEDY.max_new_tokens + 2
        tokens = slow.result(timeout=60).tokens
        assert len(tokens) == beam.max_new_tokens
        assert tokens == alone(model, bank, prompt(0), "p0", beam)
    finally:
        assert sched.close(10)
