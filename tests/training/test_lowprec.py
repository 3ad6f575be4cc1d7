"""bf16 training paths: frozen weights cast once give bit-identical steps, and short-key
attention is math attention within its measured limits."""

from __future__ import annotations

import contextlib

import pytest
import torch

from prefixtune.config import PrefixConfig
from prefixtune.core import attention
from prefixtune.core.prefix_encoder import build_encoder
from prefixtune.training.weight_cast import frozen_weights_in

from conftest import BUILDERS, DECODER_ONLY, X

BF16 = torch.bfloat16


def prefixed_loss(model, encoder) -> torch.Tensor:
    from prefixtune import prefixed_forward

    with torch.autocast("cpu", dtype=BF16):
        out = prefixed_forward(model, X, torch.ones_like(X), encoder()).logits
    return out.float().logsumexp(-1).sum()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", DECODER_ONLY)
def test_frozen_weights_cast_once_give_the_same_loss_and_gradients(name, checkpointing):
    from prefixtune.core.runtime import enable_gradient_checkpointing

    model = BUILDERS[name]()
    encoder = build_encoder(model, PrefixConfig(length=3))
    if checkpointing:  # the recomputation in backward sees the cast weights too
        enable_gradient_checkpointing(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for cast in (False, True):
        encoder.zero_grad()
        with frozen_weights_in(model, BF16 if cast else None) as count:
            loss = prefixed_loss(model, encoder)
            loss.backward()
        assert (count > 0) == cast
        results.append((loss.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)  # autocast rounds the weights to the very same bf16
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_only_frozen_untied_matmul_weights_are_cast_and_an_error_restores_them():
    model = BUILDERS["llama"]()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.requires_grad_(False)
    trainable = model.model.layers[1].mlp.down_proj.weight
    trainable.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inside"), frozen_weights_in(model, BF16):
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == BF16
        assert trainable.dtype == torch.float32
        assert model.lm_head.weight.dtype == torch.float32  # tied to the input embeddings
        assert model.model.norm.weight.dtype == torch.float32  # not a matmul weight
        raise RuntimeError("inside")
    assert all(p.dtype == torch.float32 for p in model.parameters())


BF16_U = 2.0**-8  # bf16 unit roundoff: the relative error of one rounding


def loss_and_prefix_grads(model, encoder, autocast: bool) -> tuple[torch.Tensor, list]:
    """The prefixed loss and the encoder's gradients, under bf16 autocast or in plain fp32."""
    from prefixtune import prefixed_forward

    encoder.zero_grad()
    extra = {"decoder_input_ids": X} if model.config.is_encoder_decoder else {}
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = prefixed_forward(model, X, torch.ones_like(X), encoder(), **extra).logits
    loss = out.float().logsumexp(-1).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in encoder.parameters()]


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got - exact).norm() / exact.norm())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bf16_training_attention_over_few_keys_is_math_attention(name, monkeypatch):
    """The bf16 step's loss and prefix gradients against the fp32 step's. Tolerance: every bf16
    matmul rounds its operands and result once (u = 2^-8 each), through two layers forward and
    back; the gradients measured 0.8-2.5u norm-wise from fp32 on these tiny models, PyTorch's
    own bf16 SDPA kernel 0.4-2.4u. So: within 4u of fp32, and no more than 1u further from fp32
    than PyTorch's bf16 kernel gets. A wrong gradient is off by O(1), hundreds of u."""
    model = BUILDERS[name]()
    encoder = build_encoder(model, PrefixConfig(length=3))
    exact_loss, exact = loss_and_prefix_grads(model, encoder, autocast=False)
    kernels = []
    choose = attention._fastest_kernel
    monkeypatch.setattr(attention, "_fastest_kernel", lambda *a: kernels.append(choose(*a)) or kernels[-1])  # fmt: skip
    loss, grads = loss_and_prefix_grads(model, encoder, autocast=True)
    assert kernels and set(kernels) == {"math"}
    monkeypatch.setattr(attention, "MATH_MAX_KEYS", {})  # PyTorch's bf16 SDPA kernel instead
    kernels.clear()
    sdpa_loss, sdpa = loss_and_prefix_grads(model, encoder, autocast=True)
    assert kernels and set(kernels) == {"sdpa"}
    torch.testing.assert_close(loss, exact_loss, rtol=BF16_U, atol=0.0)
    torch.testing.assert_close(sdpa_loss, exact_loss, rtol=BF16_U, atol=0.0)
    for i, (got, theirs, want) in enumerate(zip(grads, sdpa, exact, strict=True)):
        error, sdpa_error = relative_error(got, want), relative_error(theirs, want)
        assert error <= 4 * BF16_U, f"prefix grad {i}: {error / BF16_U:.2f}u from fp32"
        versus = f"{error / BF16_U:.2f}u vs SDPA's {sdpa_error / BF16_U:.2f}u"
        assert error <= sdpa_error + BF16_U, f"prefix grad {i}: {versus} from fp32"


def test_bf16_training_run_leaves_the_base_model_as_it_was(tmp_path, bpe_tokenizer, monkeypatch):
    from prefixtune.config import TrainConfig
    from prefixtune.data.builtin import builtin_examples
    from prefixtune.training import trainer as train_module
    from prefixtune.training.trainer import train

    from conftest import TOKENIZER_VOCAB, tiny_llama

    counts = []

    def spy(model, dtype):
        with frozen_weights_in(model, dtype) as count:
            counts.append(count)
            yield count

    monkeypatch.setattr(train_module, "frozen_weights_in", contextlib.contextmanager(spy))
    model = tiny_llama(TOKENIZER_VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(out=str(tmp_path / "run"), batch_size=4, lr=5e-2, max_steps=8,
                         dev_size=0, progress=False, seed=3, autocast="bfloat16",
                         max_source_tokens=48, max_target_tokens=24)  # fmt: skip
    examples = builtin_examples("train")[:16]
    summary = train(config, PrefixConfig(length=3, mlp_hidden=16), model=model,
                    tokenizer=bpe_tokenizer, train_examples=examples, dev_examples=examples)  # fmt: skip
    assert summary["autocast"] == "torch.bfloat16"
    assert counts and counts[0] > 0  # the run trained with the frozen weights in bf16
    assert summary["best_dev_loss"] < summary["initial_dev_loss"]
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(("dtype", "keys", "kernel"), [(BF16, 138, "math"), (BF16, 352, "math"),
                                                       (BF16, 400, "sdpa"), (None, 74, "sdpa"),
                                                       (None, 328, "sdpa")])  # fmt: skip
def test_math_attention_limits_follow_the_measured_crossover(dtype, keys, kernel):
    query = torch.zeros(1, 1, 128, 4)
    key = torch.zeros(1, 1, keys, 4)
    with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
        assert attention._fastest_kernel(attention._kernel_dtype(query), key) == kernel
