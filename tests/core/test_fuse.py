"""Fused frozen projections (core/fuse.py) against the same model unfused."""

from __future__ import annotations

import copy

import pytest
import torch

from prefixtune.bench.common import build_ours, synthetic_batch
from prefixtune.config import ConfigError, GenerateConfig
from prefixtune.core.fuse import fuse_projections, fused_groups, unfuse_projections
from prefixtune.core.runtime import enable_gradient_checkpointing
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad

from conftest import VOCAB, tiny_bart, tiny_gemma3, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gemma3": tiny_gemma3}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def pair(name: str):
    """(unfused, fused) copies of one tiny random model."""
    torch.manual_seed(0)
    plain = BUILDERS[name]().requires_grad_(False)  # frozen, as every prefix method keeps it
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == 2 * plain.config.num_hidden_layers
    return plain, fused


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_logits_and_greedy_tokens_match(name):
    plain, fused = pair(name)
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = plain(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for group in fused_groups(fused):
        assert group.pending == {}  # nothing held after the forward


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prefix_gradients_equal(name, checkpointing):
    plain, fused = pair(name)
    grads = []
    for model in (plain, fused):
        if checkpointing:
            enable_gradient_checkpointing(model)
        method = build_ours(model, 4, True, 16, seed=0)
        batch = synthetic_batch(VOCAB, 2, 8, seed=2)
        loss = method.loss(batch)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in method.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, **TOL)
    assert all(p.grad is None for p in fused.parameters())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_cached_decoding_with_a_prefix_is_unchanged(name):
    plain, fused = pair(name)
    rows = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids, mask = left_pad(rows, 0)
    outputs = []
    for model in (plain, fused):
        method = build_ours(model, 3, False, 16, seed=0)
        with torch.no_grad():
            prefix_kv = method.prefix_kv()
        config = GenerateConfig(max_new_tokens=12)
        outputs.append(generate(model, ids, mask, prefix_kv, config, eos_token_id=-1,
                                pad_token_id=0))  # fmt: skip
    assert outputs[0] == outputs[1]
    assert all(len(row) == 12 for row in outputs[0])


def test_state_dict_is_untouched():
    plain, fused = pair("llama")
    before, after = plain.state_dict(), fused.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert [n for n, _ in plain.named_buffers()] == [n for n, _ in fused.named_buffers()]
    layer = fused.model.layers[0]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear
    assert layer.self_attn.q_proj.weight is not fused_groups(fused)[0].weight


def test_refuses_a_weight_that_trains():
    torch.manual_seed(0)
    model = tiny_llama().requires_grad_(False)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj.*--fuse-projections"):
        fuse_projections(model)


def test_refuses_once_a_weight_is_unfrozen_later():
    plain, fused = pair("llama")
    fused.model.layers[0].self_attn.k_proj.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="k_proj"):
        fused(torch.tensor([[3, 4, 5]]))


def test_slices_are_never_reused_wrongly():
    plain, fused = pair("llama")
    mine, theirs = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine.q_proj(x), theirs.q_proj(x), **TOL)
        torch.testing.assert_close(mine.q_proj(x), theirs.q_proj(x), **TOL)  # same x twice
        x.mul_(2.0)  # in place between siblings: k must see the new values
        torch.testing.assert_close(mine.k_proj(x), theirs.k_proj(x), **TOL)
        other = torch.randn(2, 5, 32)
        torch.testing.assert_close(mine.v_proj(other), theirs.v_proj(other), **TOL)
    a = torch.randn(1, 3, 32, requires_grad=True)
    with torch.no_grad():
        assert not mine.q_proj(a).requires_grad
    assert mine.k_proj(a).requires_grad  # grad mode changed: computed afresh, with a graph


def test_input_gradient_through_shared_product():
    plain, fused = pair("llama")
    x = torch.randn(2, 4, 32, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    for attn, inp in ((plain.model.layers[0].self_attn, y), (fused.model.layers[0].self_attn, x)):
        out = attn.q_proj(inp).sum() + 2 * attn.k_proj(inp).square().sum() + attn.v_proj(inp).mean()
        out.backward()
    torch.testing.assert_close(x.grad, y.grad, **TOL)


def test_follows_loaded_weights_and_dtype():
    plain, fused = pair("llama")
    torch.manual_seed(5)
    other = tiny_llama().requires_grad_(False)
    fused.load_state_dict(other.state_dict())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, other(ids).logits, **TOL)
        fused.to(torch.bfloat16)
        other.to(torch.bfloat16)
        assert torch.equal(fused(ids).logits, other(ids).logits)
    assert fused_groups(fused)[0].weight.dtype == torch.bfloat16


def test_unfuse_and_gpt2_and_idempotence():
    plain, fused = pair("llama")
    assert fuse_projections(fused) == 0  # already fused
    assert unfuse_projections(fused) == 5 * plain.config.num_hidden_layers
    assert fused_groups(fused) == []
    torch.manual_seed(0)
    assert fuse_projections(tiny_gpt2()) == 0  # c_attn is one matmul already


def test_refuses_an_encoder_decoder_model():
    torch.manual_seed(0)
    model = tiny_bart().requires_grad_(False)
    with pytest.raises(ConfigError, match=r"--fuse-projections\) is for decoder-only models; "
                                          r"BartForConditionalGeneration"):  # fmt: skip
        fuse_projections(model)
    assert fused_groups(model) == []


def test_generate_config_flag_fuses_and_keeps_tokens():
    plain, other = pair("llama")
    unfuse_projections(other)
    rows = [[5, 6, 7, 8], [9, 10]]
    ids, mask = left_pad(rows, 0)
    outputs = []
    for model, fuse in ((plain, False), (other, True)):
        config = GenerateConfig(max_new_tokens=6, num_beams=2, fuse_projections=fuse)
        outputs.append(generate(model, ids, mask, None, config, eos_token_id=-1, pad_token_id=0))
    assert outputs[0] == outputs[1]
    assert fused_groups(other) == [] and fused_groups(plain) == []  # undone after the call


def test_generate_unfuses_what_it_fused_and_leaves_a_fused_model_fused(monkeypatch):
    import prefixtune.generation.engine as engine

    _, model = pair("llama")
    unfuse_projections(model)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    seen = []
    real = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda m, *a: seen.append(len(fused_groups(m)))
                        or real(m, *a))  # fmt: skip
    for fuse in (True, False):
        generate(model, ids, mask, None, GenerateConfig(max_new_tokens=3, fuse_projections=fuse),
                 eos_token_id=-1, pad_token_id=0)  # fmt: skip
    assert seen == [4, 0] and fused_groups(model) == []  # the second call ran unfused
    fuse_projections(model)  # fused by the caller: stays fused
    generate(model, ids, mask, None, GenerateConfig(max_new_tokens=3, fuse_projections=True),
             eos_token_id=-1, pad_token_id=0)  # fmt: skip
    assert len(fused_groups(model)) == 4
