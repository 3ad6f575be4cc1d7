"""The generation engine hands its cache to the model under the keyword the installed
transformers takes (`cache` from 5.24, `past_key_values` before): no deprecated keyword, which
5.40 removes (an unknown keyword would then be swallowed and the cache silently ignored)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from prefixtune.config import GenerateConfig
from prefixtune.core.attention import PrefixKV
from prefixtune.generation.engine import generate
from prefixtune.generation.kvcache import cache_kwargs

from conftest import X, tiny_bart, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bart])
def test_cache_keyword_is_the_one_the_forward_declares(build):
    model = build()
    (key,) = cache_kwargs(model, "sentinel")
    assert key in inspect.signature(model.forward).parameters
    if "cache" in inspect.signature(model.forward).parameters:
        assert key == "cache"


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("packed", [False, True])
def test_generate_uses_no_deprecated_cache_keyword(build, packed):
    model = build()
    heads = getattr(model.config, "num_key_value_heads", None) or model.config.n_head
    kv = torch.randn(1, 2, 2, heads, 3, 8)  # (N, L, 2, H_kv, P, D): head_dim 32 / 4
    prefix = PrefixKV({"self": kv})
    ids = torch.cat([X, X[:, :3].flip(1).repeat(1, 2)[:, :5]], 0)  # (2, 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated.*")
        rows = generate(model, ids, torch.ones_like(ids), prefix,
                        GenerateConfig(max_new_tokens=4), eos_token_id=2, pad_token_id=0,
                        prefix_in_cache=packed or None)  # fmt: skip
    assert len(rows) == 2
