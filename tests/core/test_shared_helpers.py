"""The small shared helpers of core/: device and dtype names, the autocast context, the text
config of a model's config, and the name a model is shown under."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3Config, Gemma3TextConfig, GPT2Config

from prefixtune.core.artifact import ArtifactError, save_dtype
from prefixtune.core.models import DTYPES, dtype_named, public_model_id, text_config
from prefixtune.core.runtime import autocast_context, resolve_device

from conftest import tiny_gpt2


def test_auto_device_is_cuda_only_where_cuda_is_there():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_dtype_names_long_and_short_map_to_one_dtype():
    assert dtype_named("bfloat16") is dtype_named("bf16") is torch.bfloat16
    assert dtype_named("float32") is dtype_named("fp32") is torch.float32
    assert dtype_named("float16") is dtype_named("fp16") is torch.float16
    assert set(DTYPES) == {"float32", "bfloat16", "float16"}
    with pytest.raises(ValueError, match="bf16.*got 'int8'"):
        dtype_named("int8")


def test_autocast_context_is_a_no_op_for_none_and_autocasts_otherwise():
    device = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(None, device):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    with autocast_context(torch.bfloat16, device):
        assert torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_text_config_finds_the_text_tower_or_keeps_the_config():
    gpt2 = GPT2Config()
    assert text_config(gpt2) is gpt2
    text = Gemma3TextConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    multimodal = Gemma3Config(text_config=text.to_dict())
    assert text_config(multimodal).hidden_size == 32
    assert text_config(multimodal).model_type == "gemma3_text"
    plain = SimpleNamespace(hidden_size=8)  # no get_text_config: itself
    assert text_config(plain) is plain


def test_public_model_id_never_shows_a_filesystem_path(tmp_path, monkeypatch):
    model = tiny_gpt2()
    model.config._name_or_path = "org/some-model"
    assert public_model_id(model) == "org/some-model"
    model.config._name_or_path = str(tmp_path / "runs" / "my-model")
    assert public_model_id(model) == "my-model"
    (tmp_path / "models" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    model.config._name_or_path = "models/local"
    assert public_model_id(model) == "local"  # a relative path that exists: its name only
    model.config._name_or_path = ""
    assert public_model_id(model) == "gpt2"  # no name: the model type


def test_save_dtype_allows_what_artifacts_store_and_names_the_flag():
    assert save_dtype("float32") is torch.float32 and save_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ArtifactError, match="--save-dtype must be one of"):
        save_dtype("float16")  # a model dtype, not an artifact one
