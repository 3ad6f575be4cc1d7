"""Side by side with PEFT (bench/peft_families.py) on two families, tiny Qwen2 and Gemma-3:
checks (1), (3) and the gradient check on both sides, and a wrong prefix is caught as wrong."""

from __future__ import annotations

import pytest
import torch

from prefixtune.bench import peft_families as pf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_both_sides_on_the_family(family):
    """prefixtune passes everything; PEFT's forward and training are right too, and its generate
    is recorded (it ignores the prefix on transformers >= 5.24, see docs/MODELS.md)."""
    peft, ours = pf.compare([family])[0]
    for outcome in (peft, ours):
        assert outcome.error is None, outcome.error
        assert outcome.forward <= pf.TOLERANCE
        assert outcome.trains
    assert ours.generate and ours.ok
    assert isinstance(peft.generate, bool) and peft.ok == peft.generate


def test_a_prefix_of_other_keys_is_reported_wrong(monkeypatch):
    """The keys/values of other words are a real prefix, but not the one [w; x] holds."""
    true_kv = pf.own_kv
    monkeypatch.setattr(pf, "own_kv", lambda model, words: true_kv(model, words.flip(1)))
    for outcome in pf.compare(["qwen2"])[0]:
        assert outcome.error is None
        assert outcome.forward > 1e-3
        assert not outcome.ok


def test_gradient_check_catches_a_wrong_gradient():
    param = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    assert pf.gradient_check(lambda: (param**3).sum(), param)

    class WrongGrad(torch.autograd.Function):  # forward x^3, backward claims 2x
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 2 * x

    assert not pf.gradient_check(lambda: WrongGrad.apply(param).sum(), param)


def test_markdown_rows_name_each_side():
    pairs = [(pf.Outcome("qwen2", "peft", 0.0, True, True), pf.Outcome("qwen2", "prefixtune",
              error="UnsupportedModelError: model type 'x' is not supported"))]  # fmt: skip
    table = pf.markdown(pairs)
    assert "| qwen2 | Qwen2" in table
    assert "ok (1) 0.0e+00, (3) =, trains yes" in table
    assert "refused: model type 'x' is not supported" in table
