"""PEFT interop: exported adapters give prefixtune's logits under PEFT, imported adapters give
PEFT's logits under prefixtune, round trips are exact, bad inputs get clear errors; model cards."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file

from prefixtune.cli.interop import (
    add_arguments_export,
    add_arguments_import,
    run_export,
    run_import,
)
from prefixtune.config import PrefixConfig
from prefixtune.core.artifact import ArtifactError, FoldedPrefix, load_prefix, save_prefix
from prefixtune.core.attention import position_ids_for, prefixed_forward
from prefixtune.core.prefix_encoder import build_encoder
from prefixtune.interop.formats import PEFT_CONFIG, PEFT_WEIGHTS
from prefixtune.interop.model_card import write_model_card
from prefixtune.interop.peft import export_peft, import_peft

from conftest import tiny_bart, tiny_gemma3, tiny_gpt2, tiny_llama

DECODERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
SINGLE_IDS = torch.tensor([[10, 11, 12, 13, 14, 15]])
BATCH_IDS = torch.tensor([[0, 0, 0, 20, 21, 22], [30, 31, 32, 33, 34, 35]])  # row 0 left-padded
BATCH_MASK = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def random_prefix(model, length: int = 3) -> FoldedPrefix:
    """A random folded prefix for `model` (routes its attention through prefixtune)."""
    encoder = build_encoder(model, PrefixConfig(length=length, reparam=False))
    return FoldedPrefix(encoder.bake(), {"base_model": "tiny"})


@torch.no_grad()
def ours(model, prefix: FoldedPrefix, ids, mask):
    return prefixed_forward(model, ids, mask, prefix.to_prefix_kv()).logits


@torch.no_grad()
def peft_logits(peft_model, ids, mask):
    """PEFT's logits; position ids as `generate` builds them (PEFT shifts them by P)."""
    positions = position_ids_for(mask, torch.zeros(ids.shape[0], dtype=torch.long))
    return peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def assert_same_on_real_tokens(a, b, mask):
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", DECODERS)
def test_exported_adapter_gives_prefixtune_logits_under_peft(arch, tmp_path):
    model = DECODERS[arch]()
    base_copy = copy.deepcopy(model)
    prefix = random_prefix(model)
    out = export_peft(
        prefix, tmp_path / "peft", base_model_name_or_path=arch, model_config=model.config
    )
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert config["num_attention_heads"] == (2 if arch == "llama" else 4)  # kv heads under GQA
    peft_model = PeftModel.from_pretrained(base_copy, out).eval()
    single_mask = torch.ones_like(SINGLE_IDS)
    with torch.no_grad():  # plain call, no position ids: PEFT offsets by the cache length
        theirs = peft_model(input_ids=SINGLE_IDS).logits
    torch.testing.assert_close(
        ours(model, prefix, SINGLE_IDS, single_mask), theirs, atol=1e-4, rtol=0
    )
    batch = ours(model, prefix, BATCH_IDS, BATCH_MASK)
    assert_same_on_real_tokens(batch, peft_logits(peft_model, BATCH_IDS, BATCH_MASK), BATCH_MASK)
    no_prefix = prefixed_forward(model, BATCH_IDS, BATCH_MASK, None).logits
    assert (batch - no_prefix).abs().max() > 1e-2  # the prefix matters
    assert "library_name: peft" in (out / "README.md").read_text()


@pytest.mark.parametrize("arch", DECODERS)
def test_import_of_projection_trained_adapter_matches_peft(arch, tmp_path):
    model = DECODERS[arch]()
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    )
    trained = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for param in trained.prompt_encoder.parameters():
            param.normal_(0, 0.5)
    trained.eval()
    reference = peft_logits(trained, BATCH_IDS, BATCH_MASK)  # through PEFT's MLP
    trained.save_pretrained(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "saved").eval()
    assert_same_on_real_tokens(peft_logits(reloaded, BATCH_IDS, BATCH_MASK), reference, BATCH_MASK)

    prefix = import_peft(tmp_path / "saved", model)
    assert prefix.length == 4 and prefix.meta["peft_prefix_projection"] is True
    assert_same_on_real_tokens(ours(model, prefix, BATCH_IDS, BATCH_MASK), reference, BATCH_MASK)

    # a file holding the raw prompt encoder (embedding + MLP) is folded on import
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / PEFT_CONFIG).write_text((tmp_path / "saved" / PEFT_CONFIG).read_text())
    state = {
        f"prompt_encoder.default.{k}": v
        for k, v in trained.prompt_encoder.default.state_dict().items()
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(raw_dir / PEFT_WEIGHTS))
    raw = import_peft(raw_dir, model)
    torch.testing.assert_close(raw.kv["self"], prefix.kv["self"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", DECODERS)
def test_export_import_round_trip_is_exact(arch, tmp_path):
    model = DECODERS[arch]()
    prefix = random_prefix(model, length=5)
    export_peft(prefix, tmp_path / "peft", base_model_name_or_path=arch, model_config=model.config)
    again = import_peft(tmp_path / "peft", model)
    assert again.kv.keys() == prefix.kv.keys()
    assert torch.equal(again.kv["self"], prefix.kv["self"])


def test_bad_adapters_get_one_clear_error(tmp_path):
    gpt2, llama = tiny_gpt2(), tiny_llama()
    lora = get_peft_model(copy.deepcopy(gpt2), LoraConfig(r=2, target_modules=["c_attn"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ArtifactError, match=r"lora.adapter_config\.json: peft_type is 'LORA'"):
        import_peft(tmp_path / "lora", gpt2)
    with pytest.raises(ArtifactError, match=r"nowhere: not found"):
        import_peft(tmp_path / "nowhere", gpt2)

    export_peft(
        random_prefix(gpt2), tmp_path / "g", base_model_name_or_path="g", model_config=gpt2.config
    )
    with pytest.raises(
        ArtifactError,
        match=r"adapter_model\.safetensors: 'self' prefix is for 2 layers x 4 kv heads x head_dim 8, but the model has 2 layers x 2 kv heads",
    ):
        import_peft(tmp_path / "g", llama)
    with pytest.raises(ArtifactError, match="4 kv heads .* but the model has .*2 kv heads"):
        export_peft(
            random_prefix(gpt2),
            tmp_path / "x",
            base_model_name_or_path="l",
            model_config=llama.config,
        )
    assert not (tmp_path / "x").exists()

    (tmp_path / "g" / PEFT_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match=r"g.adapter_model\.safetensors: corrupt"):
        import_peft(tmp_path / "g", gpt2)
    (tmp_path / "g" / PEFT_WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=r"g.adapter_model\.safetensors: not found"):
        import_peft(tmp_path / "g", gpt2)
    (tmp_path / "g" / PEFT_CONFIG).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"g.adapter_config\.json: corrupt JSON"):
        import_peft(tmp_path / "g", gpt2)


def test_table_shape_disagreeing_with_config_names_the_file(tmp_path):
    model = tiny_gpt2()
    out = export_peft(
        random_prefix(model), tmp_path / "p", base_model_name_or_path="g", model_config=model.config
    )
    config = json.loads((out / PEFT_CONFIG).read_text())
    (out / PEFT_CONFIG).write_text(json.dumps({**config, "num_virtual_tokens": 7}))
    with pytest.raises(
        ArtifactError, match=r"adapter_model\.safetensors: prefix table has shape \(3, 128\)"
    ):
        import_peft(out, model)


def test_infix_artifacts_are_not_exported(tmp_path):
    model = tiny_gpt2()
    infix = FoldedPrefix(random_prefix(model).kv, {"method": "infix"})
    with pytest.raises(ArtifactError, match="cannot export a 'infix' artifact"):
        export_peft(infix, tmp_path / "x", base_model_name_or_path="g", model_config=model.config)


def test_encoder_decoder_is_refused_both_ways(tmp_path):
    bart = tiny_bart()
    prefix = random_prefix(bart)
    with pytest.raises(ArtifactError, match="PEFT cannot represent"):
        export_peft(prefix, tmp_path / "b", base_model_name_or_path="b", model_config=bart.config)
    seq2seq = get_peft_model(
        copy.deepcopy(bart), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    )
    seq2seq.save_pretrained(tmp_path / "s2s")
    with pytest.raises(ArtifactError, match=r"adapter_config\.json: a SEQ_2_SEQ_LM adapter"):
        import_peft(tmp_path / "s2s", bart)


def test_sliding_window_models_warn_but_match_on_short_inputs(tmp_path):
    model = tiny_gemma3(sliding_window=16)
    base_copy = copy.deepcopy(model)
    prefix = random_prefix(model)
    with pytest.warns(UserWarning, match="sliding-window"):
        out = export_peft(
            prefix, tmp_path / "p", base_model_name_or_path="g3", model_config=model.config
        )
    peft_model = PeftModel.from_pretrained(base_copy, out).eval()
    assert_same_on_real_tokens(
        ours(model, prefix, BATCH_IDS, BATCH_MASK),
        peft_logits(peft_model, BATCH_IDS, BATCH_MASK),
        BATCH_MASK,
    )


def test_model_card_has_the_fields(tmp_path):
    model = tiny_llama()
    save_prefix(tmp_path / "p", random_prefix(model).kv, base_model="org/tiny-llama")
    path = write_model_card(
        tmp_path / "p",
        base_model="org/tiny-llama",
        task="table-to-text",
        data="E2E (42k examples)",
        metrics={"BLEU": 0.6512345, "steps": 100},
        command="prefixtune train --data e2e",
    )
    card = path.read_text()
    front = card.split("---")[1]
    assert "library_name: prefixtune" in front and 'base_model: "org/tiny-llama"' in front
    assert "- prefix-tuning\n- prefixtune" in front
    for text in (
        "table-to-text",
        "E2E (42k examples)",
        "| BLEU | 0.6512 |",
        "| steps | 100 |",
        "prefixtune train --data e2e",
        "load_prefix(",
        "PeftModel.from_pretrained(",
        "prefixtune export --to peft",
        "3 prefix positions (self: 2 layers x 2 kv heads",
    ):
        assert text in card, text


def _save_model_dir(model, path):
    """A loadable local model dir with a tiny word-level tokenizer (no network)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w3")),
        unk_token="w3",
        pad_token="w0",
        eos_token="w2",
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cli_export_from_run_dir_and_import_back(tmp_path):
    model = tiny_llama()
    model_dir = _save_model_dir(model, tmp_path / "model")
    prefix = random_prefix(model)
    save_prefix(tmp_path / "run" / "prefix", prefix.kv, base_model=model_dir,
                extra={"separator": " TL;DR: "})  # fmt: skip
    run = {"train_config": {"model": model_dir, "data": "e2e"}, "best_dev_loss": 1.25}
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))

    export = argparse.ArgumentParser()
    add_arguments_export(export)
    args = export.parse_args(["--to", "peft", str(tmp_path / "run"), str(tmp_path / "peft")])
    assert run_export(args) == 0  # the run's model is used without --model
    card = (tmp_path / "peft" / "README.md").read_text()
    assert "| best dev loss | 1.25 |" in card and "e2e" in card and "prefixtune export" in card
    assert 'Prompt format (decoder-only): `[BOS] + source + " TL;DR: "`' in card
    with pytest.raises(ArtifactError, match="already exists"):
        run_export(args)
    forced = ["--to", "peft", "--force", str(tmp_path / "run"), str(tmp_path / "peft")]
    assert run_export(export.parse_args(forced)) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    clobber = ["--to", "peft", "--force", str(tmp_path / "run"), str(tmp_path / "other")]
    with pytest.raises(ArtifactError, match="has no adapter_config.json; refusing"):
        run_export(export.parse_args(clobber))
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"

    imp = argparse.ArgumentParser()
    add_arguments_import(imp)
    argv = ["--from", "peft", str(tmp_path / "peft"), str(tmp_path / "back"), "--model", model_dir,
            "--separator", " TL;DR: "]  # fmt: skip
    assert run_import(imp.parse_args(argv)) == 0
    back = load_prefix(tmp_path / "back")
    assert torch.equal(back.kv["self"], prefix.kv["self"]) and back.meta["source"] == "peft"
    assert back.meta["separator"] == " TL;DR: "
    assert (tmp_path / "back" / "README.md").exists()
    with pytest.raises(ArtifactError, match="neither a prefix directory"):
        run_export(export.parse_args(["--to", "peft", str(tmp_path), str(tmp_path / "p2")]))
