"""Built with the flat (pre-layout) prefixtune at 2f9d47b: a tiny run directory and its outputs."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from prefixtune.artifact import load_prefix, save_prefix
from prefixtune.attention import prefixed_forward
from prefixtune.config import GenerateConfig, PrefixConfig
from prefixtune.generate import generate, left_pad
from prefixtune.prefix import build_encoder

from conftest import tiny_gpt2

out = Path(sys.argv[1])
torch.manual_seed(0)
model = tiny_gpt2()
encoder = build_encoder(model, PrefixConfig(length=3, reparam=False), seed=0)
with torch.no_grad():
    for p in encoder.parameters():
        p.add_(torch.randn_like(p))
    kv = encoder.bake()
save_prefix(out / "prefix", kv, base_model="tiny-gpt2-seed0")
prompts = [[10, 11, 12, 13], [20, 21], [30, 31, 32, 33, 34, 35]]
prefix = load_prefix(out / "prefix").to_prefix_kv()
ids, mask = left_pad(prompts, 0)
stacked = load_prefix(out / "prefix").to_prefix_kv()  # one prefix, shared by every row
with torch.no_grad():
    tokens = generate(
        model,
        ids,
        mask,
        stacked,
        GenerateConfig(max_new_tokens=6, num_beams=1),
        eos_token_id=2,
        pad_token_id=0,
    )
    fresh = load_prefix(out / "prefix").to_prefix_kv()
    logits = prefixed_forward(model, ids, mask, fresh).logits[:, -1, :8]
(out / "expected.json").write_text(
    json.dumps(
        {
            "made_with": "prefixtune flat layout (git 2f9d47b), tests/data/legacy_run/make.py",
            "model": "tiny_gpt2() from tests/conftest.py after torch.manual_seed(0)",
            "prompts": prompts,
            "tokens": tokens,
            "last_logits_first8": logits.tolist(),
        },
        indent=1,
    )
)
print(tokens)
