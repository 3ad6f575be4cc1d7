"""The per-model guard: prefixtune refuses, with the reason, a model whose prefixes it would get
silently wrong (ignored prefixes, a changed base model), and passes the families it supports."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from prefixtune.config import PrefixConfig
from prefixtune.core import attention, verify
from prefixtune.core.attention import ATTN_NAME, PrefixKV, prefixed_forward
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.prefix_encoder import KindShape, build_encoder
from prefixtune.core.runtime import enable_gradient_checkpointing
from prefixtune.core.verdict import UNVERIFIED_ENV, UnsupportedModelError
from prefixtune.core.verify import VERDICT_ATTR
from prefixtune.serving.bank import PrefixBank

from conftest import BUILDERS, X, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny random configs (2 layers, hidden 32) of families a probe found silently wrong.
FAMILIES = {
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4},
    "mpt": {"d_model": 32, "n_layers": 2, "n_heads": 4, "expansion_ratio": 2, "max_seq_len": 64},
    "stablelm": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
    },
    "gptj": {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 64},
    "gpt_oss": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32,
        "num_local_experts": 2, "num_experts_per_tok": 1, "max_position_embeddings": 64,
    },
    "gemma2": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}  # fmt: skip

# family -> (the check that refuses it, words the reason must contain)
REFUSALS = {
    "bloom": ("(b) in the path", "ALiBi"),
    "mpt": ("(b) in the path", "ALiBi"),
    "stablelm": ("(b) in the path", "never called prefixtune's function"),
    "gptj": ("(b) in the path", "bypasses transformers' attention interface"),
    "gpt_oss": ("(a) unchanged", "attention sinks"),
}
# transformers 5.24 moved GPT-J onto the attention interface: from then on it is supported.
GPTJ_ON_INTERFACE = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24)
if GPTJ_ON_INTERFACE:
    del REFUSALS["gptj"]


def tiny(model_type: str):
    config = AutoConfig.for_model(
        model_type, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **FAMILIES[model_type],
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def plain_logits(model, ids=X):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(BUILDERS))
def test_supported_models_pass_every_check(name):
    model = BUILDERS[name]()
    model.train()  # the probe runs in eval mode and gives the training mode back
    enable_prefixes(model)
    assert model.training
    build_encoder(model, PrefixConfig(length=2))
    verdict = getattr(model, VERDICT_ATTR)
    assert verdict.verified
    assert model.config._attn_implementation == ATTN_NAME
    assert verdict.unchanged <= verdict.tolerance == 1e-4
    assert set(verdict.faithful) == ({"cross"} if name == "bart" else {"self"})
    assert all(error <= 1e-4 for error in verdict.faithful.values())
    assert verdict.sites == (6 if name == "bart" else 2)  # BART: encoder, decoder, cross x 2


@pytest.mark.parametrize("family", list(REFUSALS))
def test_refuses_families_prefixes_would_get_wrong(family):
    model = tiny(family)
    original = model.config._attn_implementation
    before = plain_logits(model)
    check, reason = REFUSALS[family]
    with pytest.raises(UnsupportedModelError) as refused:
        build_encoder(model, PrefixConfig(length=2))
    message = str(refused.value)
    assert f"model type {family!r}" in message and f"check {check} failed" in message
    assert reason in message and UNVERIFIED_ENV in message
    assert refused.value.check == check and isinstance(refused.value, ValueError)
    # refused, the model is left as it was: its own attention, the same logits
    assert model.config._attn_implementation == original
    torch.testing.assert_close(plain_logits(model), before, atol=0, rtol=0)


def test_measures_by_how_much_the_base_model_changed():
    with pytest.raises(UnsupportedModelError, match=r"differ from the model's own 'eager' attention"
                       r" by [0-9.]+e-0[0-2] \(relative"):  # fmt: skip
        enable_prefixes(tiny("gpt_oss"))


def test_refuses_a_module_that_computes_attention_itself():
    model = tiny_llama()
    module = model.model.layers[1].self_attn
    real_forward = module.forward

    def own_attention(*args, **kwargs):
        """The layer's own forward, with its attention fixed to plain SDPA (a bypass)."""
        saved = model.config._attn_implementation
        model.config._attn_implementation = "sdpa"
        try:
            return real_forward(*args, **kwargs)
        finally:
            model.config._attn_implementation = saved

    module.forward = own_attention
    with pytest.raises(UnsupportedModelError) as refused:
        build_encoder(model, PrefixConfig(length=2))
    assert refused.value.check == "(b) in the path"
    assert "1 of 2 attention sites" in str(refused.value)
    assert "model.layers.1.self_attn (self layer 1)" in str(refused.value)


def test_refuses_a_prefix_the_attention_ignores(monkeypatch):
    """The keyword reaches the function at every site, but the prefix never enters attention."""
    monkeypatch.setattr(PrefixKV, "layer", lambda self, site, batch: None)
    with pytest.raises(UnsupportedModelError) as refused:
        build_encoder(tiny_llama(), PrefixConfig(length=2))
    assert refused.value.check == "(c) faithful"
    assert "the prefix is ignored" in str(refused.value)
    assert re.search(
        r"the prefix moves the logits by \d\.\d\de(\+00|-0[6-9]|-[1-9]\d)", str(refused.value)
    )


def test_refuses_a_layer_prefixtune_did_not_find(monkeypatch):
    """An attention module the site scan misses gets no prefix: only (c) can see that."""
    real_site_of = attention._site_of

    def skip_layer_1(name, module, encoder_decoder):
        return None if name == "model.layers.1.self_attn" else real_site_of(name, module, False)

    monkeypatch.setattr(attention, "_site_of", skip_layer_1)
    with pytest.raises(UnsupportedModelError) as refused:
        enable_prefixes(tiny_llama())
    assert refused.value.check == "(c) faithful"
    assert "layers [1] keep keys/values in transformers' cache" in str(refused.value)


def test_refuses_two_modules_on_one_site():
    """T5 names its cross-attention EncDecAttention: both decoder attentions of a layer land on
    one site, so the self-attention prefix would be fed to the cross-attention too."""
    config = AutoConfig.for_model(
        "t5", vocab_size=96, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError) as refused:
        enable_prefixes(model)
    assert refused.value.check == "(b) in the path"
    assert "decoder.block.0.layer.1.EncDecAttention" in str(refused.value)
    assert "cannot tell this family's attention kinds apart" in str(refused.value)


def test_cross_prefix_checked_against_concatenated_encoder_states(monkeypatch):
    """BART's (c): a cross prefix that never enters attention shows."""
    real_layer = PrefixKV.layer

    def no_cross(self, site, batch):
        return None if site.kind == "cross" else real_layer(self, site, batch)

    monkeypatch.setattr(PrefixKV, "layer", no_cross)
    with pytest.raises(UnsupportedModelError) as refused:
        enable_prefixes(BUILDERS["bart"]())
    assert refused.value.check == "(c) faithful" and "a cross prefix" in str(refused.value)
    assert "the prefix is ignored" in str(refused.value)


def test_probe_gives_each_module_its_training_flag_back():
    """Gradient checkpointing marks only its layers as training in an eval-mode model."""
    model = tiny_llama()
    enable_gradient_checkpointing(model)
    before = {name: m.training for name, m in model.named_modules()}
    assert any(before.values()) and not all(before.values())
    enable_prefixes(model)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_verdict_is_cached_per_model(monkeypatch):
    model = tiny_llama()
    enable_prefixes(model)

    def must_not_run(*args, **kwargs):
        raise AssertionError("probed twice")

    monkeypatch.setattr(verify, "verify_model", must_not_run)
    build_encoder(model, PrefixConfig(length=2))  # enables again: free
    with pytest.raises(AssertionError, match="probed twice"):
        enable_prefixes(tiny_llama())  # another model is probed


def test_escape_hatch_warns_loudly_and_keeps_the_switch(monkeypatch):
    monkeypatch.setenv(UNVERIFIED_ENV, "1")
    model = tiny("gpt_oss")
    with pytest.warns(
        UserWarning, match=r"PREFIXTUNE_UNVERIFIED=1: using a model prefixtune refused"
    ):
        enable_prefixes(model)
    verdict = getattr(model, VERDICT_ATTR)
    assert not verdict.verified and "attention sinks" in verdict.problem
    assert model.config._attn_implementation == ATTN_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_prefixes(model)  # warned once per model


@pytest.mark.parametrize("value", ["", "0", "true"])
def test_escape_hatch_needs_exactly_one(monkeypatch, value):
    monkeypatch.setenv(UNVERIFIED_ENV, value)
    with pytest.raises(UnsupportedModelError):
        enable_prefixes(tiny("mpt"))


@pytest.mark.skipif(not GPTJ_ON_INTERFACE, reason="GPT-J bypasses the interface before 5.24")
def test_gptj_on_the_attention_interface_is_verified_and_exact():
    model = tiny("gptj")
    ids = torch.tensor([[5, 17, 9, 23, 11, 30, 7]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, 4:]
        cache = model(input_ids=ids[:, :4], use_cache=True).past_key_values
    kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers])
    enable_prefixes(model)
    assert getattr(model, VERDICT_ATTR).verified
    x = ids[:, 4:]
    with torch.no_grad():
        out = prefixed_forward(model, x, torch.ones_like(x), PrefixKV({"self": kv[None]})).logits
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


def test_serving_bank_refuses_an_unsupported_model_even_with_shapes_given():
    model = tiny("stablelm")
    shapes = {"self": KindShape(layers=2, heads=2, head_dim=8)}
    with pytest.raises(UnsupportedModelError, match="stablelm"):
        PrefixBank(model, shapes)


def test_bank_on_a_supported_model_is_verified():
    model = tiny_llama()
    PrefixBank(model)
    assert getattr(model, VERDICT_ATTR).verified


def test_bfloat16_model_checked_at_its_tolerance():
    model = tiny_llama().to(torch.bfloat16)
    enable_prefixes(model)
    verdict = getattr(model, VERDICT_ATTR)
    assert verdict.tolerance == 5e-2 and verdict.unchanged <= 5e-2
    assert verdict.faithful["self"] <= 5e-2


def test_verified_model_still_matches_its_plain_self():
    """The probe switches implementations back and forth; afterwards the model is prefixtune's
    and, with no prefix, gives the plain model's logits."""
    model = tiny_llama()
    plain = copy.deepcopy(model)
    enable_prefixes(model)
    out = prefixed_forward(model, X, torch.ones_like(X), None).logits
    torch.testing.assert_close(out, plain_logits(plain), atol=1e-6, rtol=0)
