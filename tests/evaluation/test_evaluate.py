"""Evaluation and the generate/evaluate commands on a tiny model saved to a local directory."""

from __future__ import annotations

import json

import pytest
import torch

from prefixtune.cli.main import main
from prefixtune.config import GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.artifact import ArtifactError, load_prefix
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import prompt_ids
from prefixtune.evaluation.predictor import Predictor, evaluate_run
from prefixtune.generation.engine import generate
from prefixtune.training.trainer import train

from conftest import TOKENIZER_VOCAB, tiny_llama

GREEDY = GenerateConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A JSONL task folder with train/dev/test splits from the built-in examples."""
    root = tmp_path_factory.mktemp("task")
    for split, n in (("train", 12), ("dev", 6), ("test", 5)):
        rows = [{"source": e.source, "target": e.target} for e in builtin_examples(split)[:n]]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, task, model_dir):
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(data=str(task), model=str(model_dir), out=str(out), max_steps=3,
                         batch_size=4, lr=0.05, progress=False, max_source_tokens=40,
                         max_target_tokens=16)  # fmt: skip
    train(config, PrefixConfig(length=3, mlp_hidden=8))
    return out


def test_predictor_equals_the_engine_on_prompt_ids(bpe_tokenizer):
    model = tiny_llama(TOKENIZER_VOCAB)
    sources = [e.source for e in builtin_examples("dev")[:3]]
    predictor = Predictor(model, bpe_tokenizer, max_source_tokens=40)
    texts = predictor.predict(sources, GREEDY, batch_size=2)
    for source, text in zip(sources, texts, strict=True):
        ids = torch.tensor([prompt_ids(source, bpe_tokenizer, max_source_tokens=40)])
        alone = generate(model, ids, torch.ones_like(ids), None, GREEDY,
                         eos_token_id=bpe_tokenizer.eos_token_id,
                         pad_token_id=bpe_tokenizer.pad_token_id)[0]  # fmt: skip
        assert text == bpe_tokenizer.decode(alone, skip_special_tokens=True).strip()


def test_evaluate_writes_predictions_references_and_metrics(run_dir, tmp_path):
    report = evaluate_run(run_dir, "test", config=GREEDY, bootstrap=50, out=tmp_path / "ev",
                          progress=False)  # fmt: skip
    assert report["items"] == 5
    assert {"BLEU", "ROUGE_L", "BLEU_ci_low", "BLEU_ci_high"} <= set(report["metrics"])
    predictions = (tmp_path / "ev" / "predictions.txt").read_text().splitlines()
    assert len(predictions) == 5
    references = (tmp_path / "ev" / "references.txt").read_text().split("\n\n")
    assert len(references) == 5
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["items"] == 5


def test_evaluate_command_prints_a_table(run_dir, tmp_path, capsys):
    out = tmp_path / "cli-eval"
    argv = ["evaluate", "--run", str(run_dir), "--split", "dev", "--preset", "greedy",
            "--max-new-tokens", "4", "--bootstrap", "0", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "BLEU" in capsys.readouterr().out
    assert (out / "metrics.json").exists()


def test_generate_command_reads_inputs_and_stdin(run_dir, monkeypatch, capsys):
    source = builtin_examples("dev")[0].source
    assert (
        main(["generate", "--prefix", str(run_dir), "--input", source, "--max-new-tokens", "3"])
        == 0
    )
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 1
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(f"{source}\n{source}\n"))
    assert main(["generate", "--prefix", str(run_dir), "--file", "-", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == first * 2


def test_unknown_split_and_empty_input_are_clear_errors(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nothing"
    assert (
        main(["evaluate", "--run", str(run_dir), "--split", "validation", "--out", str(out)]) == 2
    )
    assert "validation" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a source\n\n"))
    assert main(["generate", "--prefix", str(run_dir), "--file", "-"]) == 2
    assert "stdin:2: empty input line" in capsys.readouterr().err


def test_prefix_for_a_different_base_model_is_refused(run_dir, bpe_tokenizer):
    prefix = load_prefix(run_dir / "prefix")
    with pytest.raises(ArtifactError, match="kv heads"):
        Predictor(tiny_llama(TOKENIZER_VOCAB), bpe_tokenizer, prefix)


def test_separator_is_kept_from_training_to_inference(task, model_dir, tmp_path):
    from prefixtune.core.models import load_model
    from prefixtune.data.encoding import encode
    from prefixtune.data.readers import load_examples

    model, tokenizer = load_model(str(model_dir))

    separator = "\nTL;DR: "
    config = TrainConfig(data=str(task), model=str(model_dir), out=str(tmp_path / "run"),
                         max_steps=1, batch_size=4, progress=False, separator=separator,
                         max_source_tokens=40, max_target_tokens=16)  # fmt: skip
    train(config, PrefixConfig(length=2, reparam=False))
    prefix = load_prefix(tmp_path / "run" / "prefix")
    assert prefix.meta["separator"] == separator
    example = load_examples(str(task), "test")[0]
    (item,), _ = encode([example], tokenizer, encoder_decoder=False, max_source_tokens=40,
                        max_target_tokens=16, separator=separator)  # fmt: skip
    trained_prompt = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label < 0]
    predictor = Predictor(model, tokenizer, prefix, 40)
    assert predictor.prompt(example.source) == trained_prompt
    assert trained_prompt != prompt_ids(example.source, tokenizer, max_source_tokens=40)
    explicit = Predictor(model, tokenizer, prefix, 40, separator="\n")
    assert explicit.prompt(example.source) == prompt_ids(example.source, tokenizer,
                                                         max_source_tokens=40)  # fmt: skip


@pytest.mark.parametrize("method", ["finetune", "ft-top2", "adapter", "embedding", "infix"])
def test_every_method_evaluates_with_the_same_command(method, task, model_dir, tmp_path):
    """`evaluate --run` on any method's run gives, item by item, what the loaded artifact
    generates alone, in the run's own prompt format (a non-default separator)."""
    from prefixtune.core.models import load_model
    from prefixtune.data.readers import load_examples
    from prefixtune.methods.baselines import load_method_artifact

    out, separator = tmp_path / method, " =>"
    config = TrainConfig(data=str(task), model=str(model_dir), out=str(out), max_steps=2,
                         batch_size=4, lr=0.05, progress=False, method=method, separator=separator,
                         max_source_tokens=40, max_target_tokens=16)  # fmt: skip
    train(config, PrefixConfig(length=2, reparam=False))
    assert main(["evaluate", "--run", str(out), "--bootstrap", "0",
                 "--preset", "greedy", "--max-new-tokens", "6", "--no-progress"]) == 0  # fmt: skip
    predictions = (out / "eval-test" / "predictions.txt").read_text().splitlines()
    sources = [e.source for e in load_examples(str(task), "test", grouped=True)]
    assert len(predictions) == len(sources) == 5
    base, tokenizer = load_model(str(model_dir))
    first = torch.tensor([prompt_ids(sources[0], tokenizer)])
    loaded = load_method_artifact(out / "prefix", load_model(str(model_dir))[0])
    for source, prediction in zip(sources, predictions, strict=True):
        ids = torch.tensor([prompt_ids(source, tokenizer, separator=separator,
                                       max_source_tokens=40)])  # fmt: skip
        mask = torch.ones_like(ids)
        alone = generate(loaded.model, ids, mask, loaded.prompt_inputs(mask)[0], GREEDY,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert prediction == tokenizer.decode(alone[0], skip_special_tokens=True).strip()
    trained = loaded.logits(first, torch.ones_like(first))
    assert not torch.allclose(trained, base(first).logits)  # the artifact changes the outputs
