"""Baking, saving and loading prefixes; the trainable set; bad artifacts."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prefixtune.config import PrefixConfig
from prefixtune.core.artifact import (
    ArtifactError,
    check_fits,
    load_encoder,
    load_prefix,
    save_encoder,
    save_prefix,
)
from prefixtune.core.attention import prefixed_forward
from prefixtune.core.prefix_encoder import KindShape, PrefixEncoder, build_encoder, model_shapes

from conftest import X, tiny_bart, tiny_gpt2, tiny_llama


def logits(model, prefix, **extra):
    return prefixed_forward(model, X, torch.ones_like(X), prefix, **extra).logits


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama, tiny_bart])
def test_folded_equals_mlp_and_saved_equals_loaded(builder, tmp_path):
    model = builder()
    extra = {"decoder_input_ids": X} if builder is tiny_bart else {}
    encoder = build_encoder(model, PrefixConfig(length=4, reparam=True, mlp_hidden=16))
    with torch.no_grad():
        through_mlp = logits(model, encoder(), **extra)
    folded = encoder.bake()
    save_prefix(tmp_path / "p", folded, base_model="tiny", prefix_config=encoder.config)
    loaded = load_prefix(tmp_path / "p")
    assert loaded.meta["length"] == 4 and loaded.meta["base_model"] == "tiny"
    for kind, tensor in folded.items():
        assert torch.equal(loaded.kv[kind], tensor)  # fp32 artifact is bit-exact
    torch.testing.assert_close(logits(model, loaded.to_prefix_kv(), **extra), through_mlp)
    save_prefix(tmp_path / "bf16", folded, base_model="tiny", dtype="bfloat16")
    half = load_prefix(tmp_path / "bf16")
    assert half.meta["dtype"] == "bfloat16"
    torch.testing.assert_close(
        logits(model, half.to_prefix_kv(), **extra), through_mlp, atol=0.05, rtol=0
    )


def test_encoder_checkpoint_keeps_the_mlp(tmp_path):
    model = tiny_llama()
    encoder = build_encoder(model, PrefixConfig(length=3, mlp_hidden=8))
    save_encoder(tmp_path / "ckpt", encoder, hidden_size=32)
    again = load_encoder(tmp_path / "ckpt")
    assert again.parts["self"].reparam
    for (name, a), (_, b) in zip(
        encoder.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_trainable_count_matches_formula():
    model = tiny_llama()  # 2 layers, 2 kv heads, head_dim 8, hidden 32
    width = 2 * 2 * 2 * 8
    table = build_encoder(model, PrefixConfig(length=5, reparam=False))
    assert table.num_trainable() == 5 * width
    mlp = build_encoder(model, PrefixConfig(length=5, mlp_hidden=16))
    assert mlp.num_trainable() == 5 * 32 + (32 * 16 + 16) + (16 * width + width)


def test_table_to_text_prefix_is_about_a_tenth_of_a_percent_of_gpt2_medium():
    config = GPT2Config(n_layer=24, n_head=16, n_embd=1024)  # GPT-2 medium geometry
    with torch.device("meta"):
        base = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    shape = KindShape(layers=24, heads=16, head_dim=64)
    encoder = PrefixEncoder(PrefixConfig(length=5, reparam=False), {"self": shape}, 1024)
    assert encoder.num_trainable() == 5 * 2 * 24 * 1024
    assert 0.0005 < encoder.num_trainable() / base < 0.002  # the paper's "0.1%"


def test_only_the_prefix_changes_after_an_optimizer_step():
    model = tiny_gpt2()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    encoder = build_encoder(model, PrefixConfig(length=3, reparam=False))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=0.1)
    assert not any(p.requires_grad for p in model.parameters())
    logits(model, encoder()).logsumexp(-1).sum().backward()
    grad = encoder.parts["self"].table.grad.view(3, 2, 2, 4, 8)  # (P, L, k/v, H, D)
    for layer in range(2):
        for kv in range(2):
            assert grad[:, layer, kv].abs().sum() > 0, f"no gradient at layer {layer} k/v {kv}"
    start = encoder.parts["self"].table.detach().clone()
    optimizer.step()
    assert not torch.equal(encoder.parts["self"].table, start)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"frozen weight {name} changed"


def test_prefix_for_another_model_shape_names_layers_heads_dims(tmp_path):
    folded = build_encoder(tiny_gpt2(), PrefixConfig(length=2)).bake()
    save_prefix(tmp_path / "p", folded, base_model="gpt2-tiny")
    loaded = load_prefix(tmp_path / "p")
    with pytest.raises(ArtifactError, match=r"2 layers x 4 kv heads x head_dim 8.*2 kv heads"):
        check_fits(loaded.shapes(), model_shapes(tiny_llama()), str(tmp_path / "p"))
    with pytest.raises(ArtifactError, match="only"):
        check_fits(loaded.shapes(), model_shapes(tiny_bart()), "p")


def test_corrupt_truncated_or_missing_files_are_clear_errors(tmp_path):
    folded = build_encoder(tiny_gpt2(), PrefixConfig(length=2)).bake()
    save_prefix(tmp_path / "p", folded, base_model="tiny")
    tensors = tmp_path / "p" / "prefix.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="prefix.safetensors.*checksum"):
        load_prefix(tmp_path / "p")
    meta = tmp_path / "p" / "prefix.json"
    meta.write_text(meta.read_text().replace('"sha256"', '"sha256_unused"'))
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_prefix(tmp_path / "p")
    meta.write_text("{not json")
    with pytest.raises(ArtifactError, match="prefix.json: corrupt JSON"):
        load_prefix(tmp_path / "p")
    with pytest.raises(ArtifactError, match="not found"):
        load_prefix(tmp_path / "nowhere")


def test_failed_save_leaves_no_half_written_file(tmp_path, monkeypatch):
    folded = build_encoder(tiny_gpt2(), PrefixConfig(length=2)).bake()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("prefixtune.core.artifact.save_file", explode)
    with pytest.raises(OSError):
        save_prefix(tmp_path / "p", folded, base_model="tiny")
    assert list((tmp_path / "p").iterdir()) == []
