"""math_attention: the training-time attention for short rows equals SDPA (values and
gradients, grouped heads, every mask form), and `attend` uses it only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefixtune.config import PrefixConfig
from prefixtune.core import attention
from prefixtune.core.math_attention import math_attention
from prefixtune.core.prefix_encoder import build_encoder

from conftest import BUILDERS, X

F64 = torch.float64


def _inputs(heads: int, kv_heads: int, dtype=F64, batch: int = 2, length: int = 5,
            prefix: int = 3, dim: int = 8):  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    shapes = ((batch, heads, length, dim), (batch, kv_heads, prefix + length, dim))

    def tensor(shape):
        return torch.randn(shape, generator=generator, dtype=F64).to(dtype).requires_grad_()

    return tensor(shapes[0]), tensor(shapes[1]), tensor(shapes[1])


def _prefix_mask(batch: int, length: int, prefix: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, length, prefix + length, dtype=torch.bool).tril(prefix)
    mask[0, ..., 1] = False  # a row whose second prefix position is masked out
    return mask  # (B, 1, T, P+T)


def _value_and_grads(fn, query, key, value, grad):
    out = fn(query, key, value)
    return [out, *torch.autograd.grad(out, (query, key, value), grad)]


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 3), (4, 1)])
@pytest.mark.parametrize("form", ["bool", "additive", "per-head", "none"])
def test_equals_sdpa_values_and_gradients(heads, kv_heads, form):
    query, key, value = _inputs(heads, kv_heads)
    mask = _prefix_mask(2, 5, 3)
    if form == "additive":
        mask = torch.zeros(mask.shape, dtype=F64).masked_fill(~mask, float("-inf"))
    elif form == "per-head":
        mask = mask.expand(2, heads, 5, 8).clone()
        mask[1, 0, :, 0] = False
    elif form == "none":
        mask = None
    grad = torch.randn(2, heads, 5, 8, dtype=F64)

    def reference(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)

    expected = _value_and_grads(reference, query, key, value, grad)
    got = _value_and_grads(lambda q, k, v: math_attention(q, k, v, mask, 0.3), query, key,
                           value, grad)  # fmt: skip
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits): one rounding of a value


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||got - expected|| / ||expected||, in fp64."""
    return float((got.detach().double() - expected.detach()).norm() / expected.detach().norm())


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 3), (4, 1)])
def test_bf16_values_and_gradients_stay_within_two_roundings_of_fp64(heads, kv_heads):
    """bf16 inputs, fp64 reference on the very same (bf16-rounded) inputs, so only the kernel's
    own rounding is measured: the probabilities and the output are each stored once in bf16,
    and each gradient matmul rounds its result once, so every tensor should sit about one unit
    roundoff u = 2^-8 from the exact value. Tolerance: norm-wise relative error <= 2u (measured
    0.6-0.9u here; PyTorch's own bf16 SDPA kernel: 0.4-1.1u). A wrong scale, mask or head
    grouping in the hand-written backward is off by O(1), hundreds of u."""
    query, key, value = _inputs(heads, kv_heads)
    mask = _prefix_mask(2, 5, 3)
    grad = torch.randn(2, heads, 5, 8, dtype=F64).bfloat16()
    low = [t.detach().bfloat16().requires_grad_() for t in (query, key, value)]
    exact = [t.detach().double().requires_grad_() for t in low]  # the same numbers in fp64

    def reference(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    expected = _value_and_grads(reference, *exact, grad.double())
    got = _value_and_grads(lambda q, k, v: math_attention(q, k, v, mask), *low, grad)
    assert all(t.dtype == torch.bfloat16 for t in got)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, expected, strict=True):
        error = _relative_error(a, b)
        assert error <= 2 * BF16_U, f"{name}: relative error {error / BF16_U:.2f}u > 2u"


def test_a_row_with_every_key_masked_stays_finite():
    query, key, value = _inputs(6, 3)
    blind = torch.zeros_like(_prefix_mask(2, 5, 3))  # a padding row: an average, not NaN
    assert math_attention(query, key, value, blind).isfinite().all()
    low = [t.detach().bfloat16().requires_grad_() for t in (query, key, value)]
    math_attention(*low, blind).float().sum().backward()
    assert all(t.grad.isfinite().all() for t in low)


def test_compiled_graphs_get_the_same_computation_through_autograd(monkeypatch):
    query, key, value = _inputs(6, 3)
    mask, grad = _prefix_mask(2, 5, 3), torch.randn(2, 6, 5, 8, dtype=F64)

    def run(q, k, v):
        return math_attention(q, k, v, mask)

    expected = _value_and_grads(run, query, key, value, grad)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the composite path
    for a, b in zip(_value_and_grads(run, query, key, value, grad), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _prefix_grads(model, encoder, kernel, monkeypatch):
    from prefixtune import prefixed_forward

    chosen, attend = [], attention.attend

    def spy(module, query, key, value, mask, kwargs, kernel_arg=None):
        math = attention._math_applies(module, query, key, value, mask, kwargs)
        chosen.append(math and kernel == "math")
        return attend(module, query, key, value, mask, kwargs, kernel)

    monkeypatch.setattr(attention, "attend", spy)
    encoder.zero_grad()
    kwargs = {"decoder_input_ids": X} if model.config.is_encoder_decoder else {}
    out = prefixed_forward(model, X, torch.ones_like(X), encoder(), **kwargs).logits
    out.logsumexp(-1).sum().backward()
    return chosen, out.detach(), [p.grad.clone() for p in encoder.parameters()]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prefix_training_through_each_model_gets_sdpa_gradients(name, monkeypatch):
    model = BUILDERS[name]()
    encoder = build_encoder(model, PrefixConfig(length=3))
    chosen, out, grads = _prefix_grads(model, encoder, "math", monkeypatch)
    assert chosen and all(chosen)  # every attention call of this training pass
    _, expected_out, expected = _prefix_grads(model, encoder, "sdpa", monkeypatch)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_math_is_chosen_for_short_training_rows_only():
    module = torch.nn.Module()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    query = torch.zeros(1, 2, 4, 8, requires_grad=True)
    key = value = torch.zeros(1, 1, 4, 8)
    assert attention._math_applies(module, query, key, value, mask, {"dropout": 0.0})
    for kwargs in ({"dropout": 0.1}, {"softcap": 30.0}, {"output_attentions": True}):
        assert not attention._math_applies(module, query, key, value, mask, kwargs)
    assert not attention._math_applies(module, query, key, value, None, {})  # implicit causal
    assert attention._math_applies(module, query, key, value, None, {"is_causal": False})
    with torch.no_grad():  # inference: SDPA's forward kernels are fast
        assert not attention._math_applies(module, query, key, value, mask, {})
    frozen = query.detach()
    assert not attention._math_applies(module, frozen, key, value, mask, {})
