"""`--quantize` on the command line: generate on an int8 base, and refusals as user errors."""

from __future__ import annotations

import copy

import pytest
import torch

from prefixtune.cli.main import main
from prefixtune.config import GenerateConfig
from prefixtune.core.quantize import quantize_model
from prefixtune.evaluation.predictor import Predictor

from conftest import TOKENIZER_VOCAB, tiny_llama

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")
SOURCES = ["name : The Eagle | food : French", "name : Aromi | area : city centre"]


def test_generate_quantize_int8_decodes_on_the_int8_base(tmp_path, bpe_tokenizer, capsys):
    torch.manual_seed(0)
    model = tiny_llama(TOKENIZER_VOCAB)
    model.save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--quantize", "int8", "--max-new-tokens", "6"]
    assert main(argv + [arg for s in SOURCES for arg in ("--input", s)]) == 0
    got = capsys.readouterr().out.splitlines()
    quantized = copy.deepcopy(model).requires_grad_(False)
    quantize_model(quantized, "int8")
    want = Predictor(quantized, bpe_tokenizer, None, 256).predict(
        SOURCES, GenerateConfig(max_new_tokens=6)
    )
    assert got == want


def test_quantize_refusals_are_user_errors(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--quantize", "int8", "--input", "x"]
    assert main(argv) == 2  # the tiny GPT-2 has Conv1D layers, no nn.Linear
    assert "Conv1D" in capsys.readouterr().err
    assert main(["train", "--quantize", "int3", "--data", "builtin"]) == 2
    assert "--quantize must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["finetune", "adapter"])
def test_generate_quantize_refuses_an_artifact_that_changes_base_weights(
    tmp_path, bpe_tokenizer, capsys, method
):
    from prefixtune.config import PrefixConfig
    from prefixtune.methods.registry import build_method

    torch.manual_seed(0)
    model = tiny_llama(TOKENIZER_VOCAB)
    model.save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    build_method(method, model, bpe_tokenizer, PrefixConfig()).save_artifact(tmp_path / "art")
    argv = ["generate", "--model", str(tmp_path / "base"), "--prefix", str(tmp_path / "art"),
            "--quantize", "int8", "--input", SOURCES[0]]  # fmt: skip
    assert main(argv) == 2
    assert f"is for prefixes only (--method prefix or multitask), not --method {method}" in (
        capsys.readouterr().err
    )
