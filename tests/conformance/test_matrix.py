"""The conformance suite and the family matrix: a representative dozen families pass every check
(1)-(5) against transformers' own references, the families prefixtune would get wrong are
refused with their reason, and with the guard bypassed the suite itself catches them (its
checks can fail). The whole matrix runs under the slow marker (PREFIXTUNE_SLOW=1 or CI)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import transformers

from prefixtune.cli.main import main
from prefixtune.conformance.matrix import Row, check_family, counts, markdown, run_matrix
from prefixtune.conformance.suite import run_suite
from prefixtune.conformance.tiny import MAX_PARAMETERS, build_tiny, families, tiny_config
from prefixtune.core.verdict import UNVERIFIED_ENV

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

# one per attention trait: MHA with learned positions, GQA + RoPE, q/k norms, sliding windows,
# MoE routing, partial rotary, parallel blocks, logit scaling, encoder-decoder (3 kinds)
PASSING = [
    "gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma3_text", "gpt_neox", "opt",
    "starcoder2", "cohere", "phi3", "gemma2", "bart", "blenderbot-small",
]  # fmt: skip
# family -> (the check that refuses it, words its reason must contain)
REFUSED = {
    "bloom": ("(b) in the path", "ALiBi"),
    "gpt_oss": ("(a) unchanged", "attention sinks"),
    "roberta": ("(a) unchanged", "numbers positions its own way"),
    "t5": ("(b) in the path", "cannot tell this family's attention kinds apart"),
    "mamba": ("sites", "recurrent or state-space"),
    "qwen3_next": ("(c) faithful", "found no attention module"),
    "deepseek_v2": ("probe", "different head sizes"),
}
MATRIX_SECONDS = 900  # the whole matrix, one core: measured ~1-2 minutes


@pytest.mark.parametrize("family", PASSING)
def test_representative_families_pass_every_check(family):
    row, report = check_family(family)
    assert row.status == "pass", row.reason
    assert [c.name for c in report.checks] == [
        "(1) own K/V", "(2) mixed batch", "(3) generation", "(4) training",
        "(5) artifact round trip",
    ]  # fmt: skip
    for check in report.checks:
        assert check.passed, f"{check.name}: {check.note}"
        if check.error is not None:
            assert check.error <= check.tolerance
    if family in ("bart", "blenderbot-small"):
        assert "cross" in report.kinds and "cross kind" in report.checks[0].note
        assert "['cross', 'decoder', 'encoder']" in report.checks[1].note or family != "bart"


@pytest.mark.parametrize("family", list(REFUSED))
def test_families_prefixtune_would_get_wrong_are_refused_with_the_reason(family):
    row, report = check_family(family)
    check, words = REFUSED[family]
    assert row.status == "refused" and report.checks == []
    assert row.reason.startswith(f"{check}:") and words in row.reason


@pytest.mark.parametrize("family", ["bloom", "gpt_oss", "roberta"])
def test_with_the_guard_bypassed_the_suite_catches_the_wrong_families(family, monkeypatch):
    """The checks can fail: let a refused family through and the suite finds it wrong."""
    monkeypatch.setenv(UNVERIFIED_ENV, "1")
    with pytest.warns(UserWarning, match=UNVERIFIED_ENV):
        report = run_suite(build_tiny(family), family)
    assert report.status == "failing"
    failed = {c.name for c in report.checks if not c.passed}
    assert "(1) own K/V" in failed, report.checks


def test_soft_capped_attention_passes_where_the_cap_matters():
    """Gemma-2 with a cap small enough to bend every score: prefixtune's eager soft-capped
    attention still equals the family's own attention, check by check."""
    config = tiny_config("gemma2")
    config.attn_logit_softcapping = 0.5
    model = build_tiny("gemma2", config=config)
    with torch.no_grad():  # scores of a few units, so the cap bends them
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(30)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    uncapped = copy.deepcopy(model)
    for module in uncapped.modules():
        if getattr(module, "attn_logit_softcapping", None):
            module.attn_logit_softcapping = None
    with torch.no_grad():
        capped_logits, plain_logits = model(input_ids=ids).logits, uncapped(input_ids=ids).logits
    assert (capped_logits - plain_logits).abs().max() > 1e-3  # the cap changes the model
    report = run_suite(model, "gemma2")
    assert report.status == "pass", report.reason


def test_tiny_configs_come_from_the_defaults_shrunk():
    config = tiny_config("llama")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, 128)
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    assert tiny_config("falcon").num_kv_heads in (1, 2)  # multi-query stays multi-query
    model = build_tiny("mixtral")
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMETERS
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2


def test_the_matrix_covers_every_text_family_and_skips_multimodal_wrappers():
    table = families()
    assert {"llama", "gpt2", "bart", "t5", "mamba"} <= set(table)
    assert table["bart"] == "seq2seq" and table["llama"] == "causal"
    (row,) = run_matrix(["gemma3"])  # the multimodal wrapper; gemma3_text is its text model
    assert row.status == "skipped" and "multimodal" in row.reason and "vision_config" in row.reason


def test_markdown_has_version_counts_and_command():
    rows = [Row("llama", "causal", "pass", "self x2"), Row("t5", "seq2seq", "refused", "", "a|b")]
    text = markdown(rows, "prefixtune models --markdown docs/MODELS.md")
    assert f"transformers {transformers.__version__}" in text
    assert "2 families: 1 pass, 1 refused with the reason" in text and "0 failing" in text
    assert "`prefixtune models --markdown docs/MODELS.md`" in text
    assert "| t5 | seq2seq |  | refused | a\\|b |  |" in text
    assert counts(rows)["failing"] == 0


def test_models_command_prints_the_matrix_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "MODELS.md"
    assert main(["models", "--family", "llama", "--family", "t5", "--markdown", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llama" in printed and "pass" in printed and "refused" in printed
    table = out.read_text()
    assert "| llama | causal | self x2 | pass |  |  |" in table
    assert "| t5 | seq2seq | encoder x2, decoder x2 | refused | (b) in the path:" in table
    assert "relative position bias entries for prefix keys |" in table  # what t5 would need
    out.write_text(out.read_text() + "\n## Written by hand\n\nkeep me\n")
    assert main(["models", "--family", "llama", "--markdown", str(out)]) == 0
    regenerated = out.read_text()  # the matrix is new, what follows the marker stays
    assert "| t5 |" not in regenerated and regenerated.endswith("## Written by hand\n\nkeep me\n")


def test_models_check_runs_the_suite_on_a_directory_and_a_name(model_dir, capsys):
    assert main(["models", "--check", str(model_dir)]) == 0
    printed = capsys.readouterr().out
    assert ": pass" in printed and "ok   (3) generation" in printed
    assert main(["models", "--check", "bloom"]) == 3
    assert "refused: (b) in the path" in capsys.readouterr().out
    assert main(["models", "--check", "no-such-family"]) == 2
    assert "neither a model directory nor a model type" in capsys.readouterr().err


@pytest.mark.slow
def test_the_whole_matrix_has_no_silently_wrong_family():
    start = time.perf_counter()
    rows = run_matrix()
    failing = [(r.family, r.reason) for r in rows if r.status == "failing"]
    assert failing == []
    assert {r.family for r in rows} == set(families())
    assert counts(rows)["pass"] >= len(PASSING)
    assert time.perf_counter() - start < MATRIX_SECONDS
