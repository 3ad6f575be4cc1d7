"""Prefix injection against independent computations on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from prefixtune.config import ConfigError, PrefixConfig
from prefixtune.core import attention
from prefixtune.core.attention import SITE_ATTR, KVCapture, PrefixKV, prefixed_forward
from prefixtune.core.prefix_encoder import build_encoder, capture_kv, model_shapes
from prefixtune.core.runtime import enable_gradient_checkpointing

from conftest import BUILDERS, DECODER_ONLY, tiny_bart, tiny_gemma3, tiny_gpt2, tiny_llama

WORDS = torch.tensor([[5, 6, 7, 8]])
X = torch.tensor([[10, 11, 12, 13, 14]])


def logits(model, ids, mask=None, prefix=None, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return prefixed_forward(model, ids, mask, prefix, **kwargs).logits


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("reparam", [False, True])
def test_real_word_prefix_equals_lm_on_words_then_x(builder, reparam, char_tokenizer):
    model = builder()
    reference = model(torch.cat([WORDS, X], 1)).logits[:, WORDS.shape[1] :]
    text = "".join(chr(i - 3) for i in WORDS[0].tolist())  # CharTokenizer maps back to WORDS
    config = PrefixConfig(length=0, init="words", init_text=text, reparam=reparam)
    encoder = build_encoder(model, config, char_tokenizer)
    assert encoder.config.length == WORDS.shape[1]
    torch.testing.assert_close(logits(model, X, prefix=encoder()), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_absent_and_zero_length_prefix_equal_plain_model(name):
    model = BUILDERS[name]()
    plain = copy.deepcopy(model)
    extra = {"decoder_input_ids": X} if name == "bart" else {}
    reference = plain(input_ids=X, **extra).logits
    build_encoder(model, PrefixConfig(length=2))  # routes attention through prefixtune
    torch.testing.assert_close(logits(model, X, **extra), reference, atol=1e-6, rtol=0)
    empty = {
        k: v[:, :, :, :, :0] for k, v in build_encoder(model, PrefixConfig()).forward().kv.items()
    }
    out = logits(model, X, prefix=PrefixKV(empty), **extra)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama, tiny_gemma3])
def test_mixed_batch_equals_each_row_alone(builder, padding_side):
    model = builder()
    lengths = [3, 5, 2]  # three prefixes of different lengths
    prefixes = [build_encoder(model, PrefixConfig(length=n, reparam=False)).bake() for n in lengths]
    rows = [torch.tensor([9, 8, 7, 6, 5]), torch.tensor([4, 5, 6]), torch.tensor([20, 21, 22, 23])]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    order = torch.tensor([2, 0, 1])  # row i uses prefix order[i]
    batch = logits(model, ids, mask, PrefixKV.stack(prefixes, rows=order))
    for i, row in enumerate(rows):
        alone = logits(model, row[None], prefix=PrefixKV.stack([prefixes[order[i]]]))
        real = mask[i].bool()
        torch.testing.assert_close(batch[i, real], alone[0], atol=1e-5, rtol=0)


def _window_masks(p_len: int, t_len: int, window: int) -> dict[str, torch.Tensor]:
    """Additive (1, 1, P+T, P+T) masks for transformers' eager attention over [w; x], by layer
    type, built by hand: full layers are causal; sliding layers keep the last `window` keys,
    except that x's queries always see all of w (w is a prefix, not a part of the window)."""
    query = torch.arange(p_len + t_len)[:, None]
    key = torch.arange(p_len + t_len)[None, :]
    causal = key <= query
    sliding = causal & ((query - key < window) | ((query >= p_len) & (key < p_len)))
    return {
        kind: torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]
        for kind, keep in (("full_attention", causal), ("sliding_attention", sliding))
    }


def test_gemma3_prefix_stays_visible_beyond_sliding_window():
    """A prefix of the model's own keys/values of words w, then x longer than the window: the
    logits equal transformers' eager forward on [w; x] with hand-built masks under which every
    query of x sees all of w in the sliding layer too (and keeps its window over x)."""
    window, words, x = 3, torch.tensor([[40, 41, 42, 43]]), torch.arange(10, 19)[None]
    model = tiny_gemma3(sliding_window=window)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    p_len, t_len = words.shape[1], x.shape[1]
    masks = _window_masks(p_len, t_len, window)
    with torch.no_grad():
        reference = eager(torch.cat([words, x], 1), attention_mask=masks).logits[:, p_len:]
        plain = eager(torch.cat([words, x], 1)).logits[:, p_len:]  # w slides out of view
        prefix = PrefixKV({"self": capture_kv(model, words)["self"][None]})
        out = logits(model, x, prefix=prefix)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert (plain - reference).abs().max() > 1e-3  # the window matters for this prompt


def test_words_init_on_gemma3_matches_within_window(char_tokenizer):
    model = tiny_gemma3(sliding_window=32)  # window larger than [w; x]: plain equality holds
    reference = model(torch.cat([WORDS, X], 1)).logits[:, WORDS.shape[1] :]
    text = "".join(chr(i - 3) for i in WORDS[0].tolist())
    config = PrefixConfig(length=0, init="words", init_text=text, reparam=False)
    encoder = build_encoder(model, config, char_tokenizer)
    torch.testing.assert_close(logits(model, X, prefix=encoder()), reference, atol=1e-5, rtol=0)


def test_bart_each_prefix_kind_changes_output_and_can_be_switched_off():
    model = tiny_bart()
    extra = {"decoder_input_ids": X}
    full = build_encoder(model, PrefixConfig(length=3, reparam=False))
    assert set(full.shapes) == {"encoder", "decoder", "cross"}
    base = logits(model, X, **extra)
    kv = full().kv
    for kind in ("encoder", "decoder", "cross"):
        changed = logits(model, X, prefix=PrefixKV({kind: kv[kind]}), **extra)
        assert (changed - base).abs().max() > 1e-5, f"{kind} prefix had no effect"  # noise ~1e-7
        kinds = tuple(k for k in kv if k != kind)
        switched_off = build_encoder(model, PrefixConfig(length=3, reparam=False, kinds=kinds))
        assert set(switched_off().kv) == set(kinds)
        for k in kinds:  # reuse the full prefix's tensors: the switched-off kind is simply absent
            switched_off.parts[k].table.data.copy_(full.parts[k].table.data)
        expected = logits(model, X, prefix=PrefixKV({k: kv[k] for k in kinds}), **extra)
        torch.testing.assert_close(logits(model, X, prefix=switched_off(), **extra), expected)


def test_native_gqa_path_equals_repeated_heads(monkeypatch):
    model = tiny_llama()  # 4 query heads share 2 kv heads
    prefix = PrefixKV.stack([build_encoder(model, PrefixConfig(length=3, reparam=False)).bake()])
    ids, mask = torch.tensor([[0, 9, 8, 7], [4, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1], [1] * 4])
    native = logits(model, ids, mask, prefix)
    module = model.model.layers[0].self_attn
    query, bool_mask = torch.zeros(1, 4, 3, 8), torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert attention._native_gqa(module, query, bool_mask, {"dropout": 0.0})
    for option in ({"softcap": 30.0}, {"position_bias": query}, {"output_attentions": True}):
        assert not attention._native_gqa(module, query, bool_mask, option)  # transformers' path
    monkeypatch.setattr(attention, "_native_gqa", lambda *args: False)  # transformers' repeat_kv
    torch.testing.assert_close(native, logits(model, ids, mask, prefix), atol=1e-6, rtol=0)


def test_shapes_follow_gqa_and_head_dim():
    assert model_shapes(tiny_llama())["self"].heads == 2  # kv heads, not query heads
    assert model_shapes(tiny_gemma3())["self"].head_dim == 16
    shapes = model_shapes(tiny_bart())
    assert {k: (s.layers, s.heads) for k, s in shapes.items()} == {
        "encoder": (2, 4),
        "decoder": (2, 4),
        "cross": (2, 4),
    }


def test_capture_matches_prefix_length():
    kv = capture_kv(tiny_llama(), WORDS)["self"]
    assert kv.shape == (2, 2, 2, WORDS.shape[1], 8)  # (L, k/v, H_kv, P, D)


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_gradient_checkpointing_gives_same_gradients(name):
    model = BUILDERS[name]()
    encoder = build_encoder(model, PrefixConfig(length=3))
    calls = []
    first_attention = next(m for m in model.modules() if hasattr(m, SITE_ATTR))
    first_attention.register_forward_hook(lambda *_: calls.append(1))  # runs inside the layer
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls.clear()
        encoder.zero_grad()
        logits(model, X, prefix=encoder()).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_keeps_bart_dropout_off():
    """BART layers drop out with their own training flag, which checkpointing must set."""
    from prefixtune.methods.objective import hidden_states, target_loss

    model = tiny_bart()
    model.config.dropout = model.config.activation_dropout = 0.5
    model = type(model)(model.config).eval()
    encoder = build_encoder(model, PrefixConfig(length=3))
    labels = torch.tensor([[5, 6, 7, 2]])
    batch = {"input_ids": X, "attention_mask": torch.ones_like(X), "labels": labels}

    def loss() -> torch.Tensor:
        return target_loss(model, hidden_states(model, batch, encoder()), labels)

    plain = loss()
    enable_gradient_checkpointing(model)
    checkpointed = [loss() for _ in range(3)]
    assert all(torch.equal(plain, again) for again in checkpointed)


def test_bf16_autocast_trains_the_prefix():
    model = tiny_llama()
    encoder = build_encoder(model, PrefixConfig(length=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, X, prefix=encoder())
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize("length", [0, -3])
def test_bad_prefix_length_is_a_clear_error(length):
    with pytest.raises(ConfigError, match="prefix length"):
        PrefixConfig(length=length)


def test_init_text_that_tokenises_to_nothing(char_tokenizer):
    with pytest.raises(ConfigError, match="init_text"):
        PrefixConfig(length=0, init="words", init_text="  ")
    with pytest.raises(ConfigError, match="tokenises to no tokens"):
        config = PrefixConfig(length=0, init="words", init_text="x")
        build_encoder(tiny_gpt2(), config, lambda text, add_special_tokens: {"input_ids": []})


def test_infix_is_seen_only_from_its_index_on():
    """[x; INFIX; y] with the infix = the K/V of real words w inside [x; w; y]: x's outputs are
    the plain model's on x, y's equal the plain model's on [x; w; y]."""
    model = tiny_llama()
    build_encoder(model, PrefixConfig(length=1))
    x, w, y = torch.arange(10, 15)[None], torch.tensor([[40, 41, 42]]), torch.arange(20, 24)[None]
    full = torch.cat([x, w, y], 1)
    reference = model(full).logits
    capture = KVCapture()
    model(full, prefix_kv=capture)
    span = slice(x.shape[1], x.shape[1] + w.shape[1])
    kv = torch.stack([torch.stack([k[0, :, span], v[0, :, span]]) for _, (k, v) in
                      sorted(capture.records.items(), key=lambda item: item[0].layer)])  # fmt: skip
    infix = PrefixKV({"self": kv[None]}, visible_from=torch.tensor([x.shape[1]]))
    xy = torch.cat([x, y], 1)
    positions = torch.cat([torch.arange(5), torch.arange(8, 12)])[None]  # y sits after w
    out = logits(model, xy, prefix=infix, position_ids=positions)
    torch.testing.assert_close(out[:, :5], model(x).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], reference[:, 8:], atol=1e-5, rtol=0)
