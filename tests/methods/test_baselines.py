"""The paper's baselines on tiny random models: what trains, what stays frozen, that each learns,
where the infix sits, artifacts that load back exactly, and the shared trainer with resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

from prefixtune.config import ConfigError, GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.artifact import ArtifactError
from prefixtune.core.attention import KVCapture, PrefixKV
from prefixtune.core.models import lm_logits
from prefixtune.core.runtime import enable_gradient_checkpointing
from prefixtune.data.builtin import builtin_examples
from prefixtune.data.encoding import collate, collate_seq2seq, encode
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad
from prefixtune.methods import baselines
from prefixtune.methods.modules import (
    adapter_parameters,
    adapter_sites,
    infix_boundary,
    place_infix,
    prepend_virtual,
)
from prefixtune.methods.objective import hidden_states
from prefixtune.methods.registry import build_method
from prefixtune.training.trainer import Trainer

from conftest import TOKENIZER_VOCAB, tiny_bart, tiny_gpt2, tiny_llama

METHODS = ("finetune", "ft-top2", "adapter", "embedding", "infix")
PREFIX = PrefixConfig(length=4, mlp_hidden=16)
LIMITS = {"max_source_tokens": 48, "max_target_tokens": 24}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def gpt2_4layers(vocab: int = TOKENIZER_VOCAB) -> GPT2LMHeadModel:
    """Four layers, so that ft-top2 leaves two of them frozen."""
    config = GPT2Config(n_layer=4, n_head=4, n_embd=32, vocab_size=vocab, n_positions=128,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"gpt2": gpt2_4layers, "llama": tiny_llama}


def make(name: str, tokenizer, arch: str = "gpt2", prefix: PrefixConfig = PREFIX, **options):
    torch.manual_seed(0)  # the same frozen base every time
    return build_method(name, BUILDERS[arch](TOKENIZER_VOCAB), tokenizer, prefix, **options)


def batch_of(tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    items, _ = encode(builtin_examples("train")[:n], tokenizer, encoder_decoder=False, **LIMITS)
    return collate(items, tokenizer.pad_token_id)


def step(method, batch, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=weight_decay)
    method.loss(batch).backward()
    optimizer.step()


# ----------------------------------------------------------------------------- what trains


def test_trainable_counts_follow_the_formulas(bpe_tokenizer):
    d, layers, v = 32, 4, TOKENIZER_VOCAB
    base = v * d + 128 * d + layers * (12 * d * d + 13 * d) + 2 * d  # wte, wpe, blocks, ln_f
    counts = {name: make(name, bpe_tokenizer).num_trainable() for name in METHODS}
    assert make("finetune", bpe_tokenizer).num_base() == base
    assert counts["finetune"] == base
    assert counts["ft-top2"] == 2 * (12 * d * d + 13 * d)
    assert counts["adapter"] == 2 * layers * (2 * d * 1 + 1 + d)  # 0.1% of 65K params: bottleneck 1
    assert counts["embedding"] == PREFIX.length * d
    width = 2 * layers * 4 * (d // 4)  # 2 x L x H_kv x D
    mlp = PREFIX.length * d + d * PREFIX.mlp_hidden + PREFIX.mlp_hidden
    assert counts["infix"] == mlp + PREFIX.mlp_hidden * width + width
    adapter = make("adapter", bpe_tokenizer, adapter_share=0.03)
    m = round((0.03 * base - 2 * layers * d) / (2 * 2 * layers * d + 2 * layers))
    assert adapter.adapters.bottleneck == m > 1
    assert adapter.num_trainable() == adapter_parameters([d] * 2 * layers, m)
    assert adapter.share() == pytest.approx(0.03, rel=0.1)


def test_ft_top2_on_llama_counts_two_layers(bpe_tokenizer):
    method = make("ft-top2", bpe_tokenizer, arch="llama")
    d, kv, inter = 32, 2 * 8, 64
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d  # q, o, k, v, MLP, two norms
    assert method.num_trainable() == 2 * per_layer  # tiny_llama has 2 layers: all of them


def overfit(method, batch, lr: float, steps: int) -> tuple[float, float]:
    """The loss on `batch` before and after `steps` AdamW steps on it."""
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr)
    first = method.loss(batch).item()
    for _ in range(steps):
        optimizer.zero_grad()
        method.loss(batch).backward()
        optimizer.step()
    return first, method.loss(batch).item()


@pytest.mark.parametrize("name", ["finetune", "ft-top2", "adapter"])
def test_weight_methods_train_bart(name, bpe_tokenizer):
    torch.manual_seed(0)
    model = tiny_bart(TOKENIZER_VOCAB)
    model.config.pad_token_id = bpe_tokenizer.pad_token_id
    method = build_method(name, model, bpe_tokenizer, PREFIX, adapter_share=0.03)
    if name == "ft-top2":
        assert set(method.layers) == {"model.decoder.layers.0", "model.decoder.layers.1"}
    items, _ = encode(builtin_examples("train")[:4], bpe_tokenizer, encoder_decoder=True, **LIMITS)
    batch = collate_seq2seq(items, bpe_tokenizer.pad_token_id)
    first, last = overfit(method, batch, lr=1e-2, steps=10)
    assert last < first - 0.02  # adapter (smallest): 0.043 measured


def test_adapter_sites_per_architecture():
    assert len(adapter_sites(tiny_gpt2())) == 4  # 2 layers x (attention, MLP)
    assert len(adapter_sites(tiny_llama())) == 4
    bart = adapter_sites(tiny_bart())  # encoder 2 x 2, decoder 2 x 3 (self, cross, MLP)
    assert len(bart) == 10 and any("encoder_attn.out_proj" in name for name in bart)
    with pytest.raises(ConfigError, match="not a supported architecture"):
        adapter_sites(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize(
    "config", [{}, {"n_layer": 24, "n_embd": 1024, "n_head": 16}], ids=["gpt2", "gpt2-medium"]
)
@pytest.mark.parametrize("share", [0.001, 0.03])
def test_adapter_share_on_gpt2_sized_models(config, share):
    with torch.device("meta"):  # parameter counts only, no memory
        model = GPT2LMHeadModel(GPT2Config(**config))
        method = build_method("adapter", model, None, PrefixConfig(), adapter_share=share)
    widths = list(method.adapters.sites.values())
    step_size = (2 * sum(widths) + len(widths)) / method.num_base()  # one bottleneck unit
    assert abs(method.share() - share) <= step_size / 2
    assert method.share() == pytest.approx(share, rel=0.05)


def test_embedding_and_infix_reject_encoder_decoder_models():
    for name in ("infix", "embedding"):
        with pytest.raises(ConfigError, match="decoder-only"):
            build_method(name, tiny_bart(), None, PREFIX)


# ----------------------------------------------------------------------------- what stays frozen


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", METHODS)
def test_only_the_trained_part_changes_after_an_optimizer_step(name, arch, bpe_tokenizer):
    method = make(name, bpe_tokenizer, arch)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    own = [p.detach().clone() for p in method.parameters()]
    step(method, batch_of(bpe_tokenizer), weight_decay=0.1)  # decay would touch any leaked param
    pointers = {p.data_ptr() for p in method.model.parameters() if p.requires_grad}
    state = method.model.state_dict()  # tied weights appear under both names
    trained = {k for k, v in state.items() if v.data_ptr() in pointers}
    for key, value in state.items():
        if key in trained:
            assert not torch.equal(value, before[key]), f"{name}: {key} did not train"
        else:
            assert torch.equal(value, before[key]), f"{name}: frozen {key} changed"
    if name == "ft-top2":
        top = {k.split(".")[2] for k in trained}  # transformer.h.N... / model.layers.N...
        assert top == ({"2", "3"} if arch == "gpt2" else {"0", "1"})
    if name == "finetune":
        assert trained == set(dict(method.model.named_parameters(remove_duplicate=False)))
    elif name != "ft-top2":
        assert not trained  # the base is untouched; the method's own parameters trained
        assert any(not torch.equal(p, q) for p, q in zip(method.parameters(), own, strict=True))


def test_finetune_keeps_dropout_off(bpe_tokenizer):
    method = make("finetune", bpe_tokenizer)
    method.train()
    batch = batch_of(bpe_tokenizer)
    assert not method.model.training and method.model.config.resid_pdrop > 0
    assert torch.equal(method.loss(batch), method.loss(batch))


# ----------------------------------------------------------------------------- learning


# A frozen random tiny model is near uniform (ln 320 = 5.77). Methods that train weights move it
# a lot; infix and adapters a little; the embedding-only method least (measured after 25 steps:
# finetune 4.2, ft-top2 0.46, adapter 0.098, infix 0.22, embedding 0.0066 on llama). The
# thresholds are about half of that; every run is seeded and deterministic.
OVERFIT = {  # method: (arch, lr, required drop)
    "finetune": ("gpt2", 1e-2, 2.0),
    "ft-top2": ("gpt2", 1e-2, 0.2),
    "adapter": ("gpt2", 1e-2, 0.05),
    "infix": ("gpt2", 1e-1, 0.1),
    "embedding": ("llama", 1e-1, 0.003),
}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_lowers_the_loss_on_a_tiny_overfit_task(name, bpe_tokenizer):
    arch, lr, drop = OVERFIT[name]
    method = make(name, bpe_tokenizer, arch)
    batch = batch_of(bpe_tokenizer)
    first, last = overfit(method, batch, lr=lr, steps=25)
    assert last < first - drop


# ----------------------------------------------------------------------------- infix placement


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_infix_sits_between_source_and_target(arch, bpe_tokenizer):
    method = make("infix", bpe_tokenizer, arch)
    batch = batch_of(bpe_tokenizer)
    plain = hidden_states(method.model, batch)
    boundary = infix_boundary(batch["labels"])
    prefix, positions = place_infix(method.prefix_kv(), batch["attention_mask"], boundary)
    with torch.no_grad():
        infixed = hidden_states(method.model, batch, prefix, position_ids=positions)
    for row in range(len(boundary)):
        b, real = int(boundary[row]), batch["attention_mask"][row].bool()
        first_target = int((batch["labels"][row] != -100).nonzero()[0])
        assert b == first_target - 1  # the last prompt token
        torch.testing.assert_close(infixed[row, :b], plain[row, :b], atol=1e-6, rtol=0)
        changed = (infixed[row, b:][real[b:]] - plain[row, b:][real[b:]]).abs().amax(-1)
        assert bool((changed > 1e-3).all())  # the last prompt token and every target see it


def test_infix_of_real_words_equals_the_lm_with_the_words_inserted():
    """Infix = the K/V of words w inside [x; w; s; y]: with [x; s; y] and the infix before s,
    x's logits are the LM's on x, and from s on they equal the LM's on [x; w; s; y]."""
    model = tiny_llama()
    build_method("infix", model, None, PREFIX)  # routes attention through prefixtune
    x, w, sy = torch.arange(10, 15)[None], torch.tensor([[40, 41, 42]]), torch.arange(20, 25)[None]
    full = torch.cat([x, w, sy], 1)
    capture = KVCapture()
    reference = model(full, prefix_kv=capture).logits
    span = slice(5, 8)
    kv = torch.stack([torch.stack([k[0, :, span], v[0, :, span]]) for _, (k, v) in
                      sorted(capture.records.items(), key=lambda item: item[0].layer)])  # fmt: skip
    ids = torch.cat([x, sy], 1)
    loaded = baselines.Loaded("infix", model, PrefixKV({"self": kv[None]}))
    out = loaded.logits(ids, torch.ones_like(ids), boundary=torch.tensor([5]))
    torch.testing.assert_close(out[:, :5], model(x).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], reference[:, 8:], atol=1e-5, rtol=0)
    prompt = torch.cat([x, sy[:, :1]], 1)  # generation: the infix before the last prompt token
    torch.testing.assert_close(loaded.logits(prompt, torch.ones_like(prompt))[:, -1],
                               reference[:, 8], atol=1e-5, rtol=0)  # fmt: skip


def test_infix_prompt_inputs_decode_with_a_kv_cache():
    """The generation contract: prefill the left-padded prompt with infix_prompt_inputs, then
    step with positions + 1 and the same PrefixKV; equals a full forward over [prompt; token]."""
    model = tiny_llama()
    method = build_method("infix", model, None, PREFIX)
    prefix = PrefixKV({"self": method.encoder.bake()["self"][None]})
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12, 13]], pad_token_id=0)
    placed, positions = baselines.infix_prompt_inputs(prefix, mask)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, prefix_kv=placed)  # fmt: skip
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        longer = torch.cat([mask, torch.ones_like(token)], 1)
        stepped = model(input_ids=token, attention_mask=longer, position_ids=positions[:, -1:] + 1,
                        past_key_values=cache, use_cache=True, prefix_kv=placed).logits  # fmt: skip
    full = baselines.Loaded("infix", model, prefix).logits(
        torch.cat([ids, token], 1), longer, boundary=torch.full((2,), ids.shape[1] - 1)
    )
    torch.testing.assert_close(out.logits[:, -1], full[:, -2], atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped[:, -1], full[:, -1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- embedding-only


def test_word_initialised_embeddings_equal_the_lm_on_words_then_x(bpe_tokenizer):
    prefix = PrefixConfig(length=0, init="words", init_text="table-to-text:")
    method = make("embedding", bpe_tokenizer, "llama", prefix)
    words = torch.tensor([bpe_tokenizer("table-to-text:", add_special_tokens=False)["input_ids"]])
    batch = batch_of(bpe_tokenizer, 1)
    inputs, _ = prepend_virtual(method.model, method.module.embeddings, batch)
    with torch.no_grad():
        ours = lm_logits(method.model, method.model.base_model(**inputs).last_hidden_state)
        reference = method.model(torch.cat([words, batch["input_ids"]], 1)).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- save and load


def training_logits(method, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) over the real tokens as the training forward computes them."""
    model = method.model
    if method.name == "embedding":
        inputs, _ = prepend_virtual(model, method.module.embeddings, batch)
        hidden = model.base_model(**inputs).last_hidden_state[
            :, method.module.embeddings.shape[0] :
        ]
    elif method.name == "infix":
        boundary = infix_boundary(batch["labels"])
        prefix, positions = place_infix(method.prefix_kv(), batch["attention_mask"], boundary)
        hidden = hidden_states(model, batch, prefix, position_ids=positions)
    else:
        hidden = hidden_states(model, batch)
    return lm_logits(model, hidden)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", METHODS)
def test_saved_artifact_loads_back_to_identical_outputs(name, arch, bpe_tokenizer, tmp_path):
    method = make(name, bpe_tokenizer, arch)
    batch = batch_of(bpe_tokenizer)
    for _ in range(3):
        step(method, batch, lr=5e-2)
    method.save_artifact(tmp_path / "artifact", step=3)
    with torch.no_grad():
        expected = training_logits(method, batch)
    torch.manual_seed(0)
    loaded = baselines.load_method_artifact(tmp_path / "artifact", BUILDERS[arch](TOKENIZER_VOCAB))
    assert loaded.method == name and loaded.meta["step"] == 3
    boundary = infix_boundary(batch["labels"]) if name == "infix" else None
    out = loaded.logits(batch["input_ids"], batch["attention_mask"], boundary=boundary)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)
    reloaded = baselines.load_method_artifact(tmp_path / "artifact", loaded.model)
    prefix = reloaded.prefix
    assert (prefix is None) == (name in ("finetune", "ft-top2", "adapter"))
    files = {p.name for p in (tmp_path / "artifact").iterdir()}
    saved = sum(t.numel() for f in files if f.endswith(".safetensors")
                for t in load_file(tmp_path / "artifact" / f).values())  # fmt: skip
    if name in ("ft-top2", "adapter", "embedding"):
        assert saved == method.num_trainable()  # only what trains is stored


def greedy_by_full_forwards(loaded, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache), one row alone."""
    ids = torch.tensor([prompt])
    boundary = torch.tensor([len(prompt) - 1]) if loaded.method == "infix" else None
    for _ in range(steps):
        logits = loaded.logits(ids, torch.ones_like(ids), boundary=boundary)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", METHODS)
def test_generation_engine_runs_every_loaded_method(name, bpe_tokenizer, tmp_path):
    method = make(name, bpe_tokenizer, "llama")
    step(method, batch_of(bpe_tokenizer), lr=5e-2)
    method.save_artifact(tmp_path / "artifact")
    torch.manual_seed(0)
    loaded = baselines.load_method_artifact(tmp_path / "artifact", tiny_llama(TOKENIZER_VOCAB))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = left_pad(prompts, pad_token_id=0)
    prefix, _ = loaded.prompt_inputs(mask)  # infix: visible_from = T - 1
    config = GenerateConfig(max_new_tokens=6)
    out = generate(loaded.model, ids, mask, prefix, config, eos_token_id=[], pad_token_id=0)
    assert out == [greedy_by_full_forwards(loaded, p, 6) for p in prompts]


def test_adapters_loaded_onto_their_own_model_replace_the_trained_ones(bpe_tokenizer, tmp_path):
    method = make("adapter", bpe_tokenizer, adapter_share=0.03)
    batch = batch_of(bpe_tokenizer)
    for _ in range(2):
        step(method, batch)
    method.save_artifact(tmp_path / "a")
    expected = training_logits(method, batch).detach()
    loaded = baselines.load_method_artifact(tmp_path / "a", method.model)  # same model object
    out = loaded.logits(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)  # one set, not two
    loaded.module.detach()
    torch.manual_seed(0)
    plain = gpt2_4layers()  # the same seeded base, no adapters
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.testing.assert_close(loaded.logits(ids, mask), plain(ids, attention_mask=mask).logits)


def test_prefix_artifacts_load_through_the_same_entry_point(bpe_tokenizer, tmp_path):
    method = make("prefix", bpe_tokenizer)
    method.save_artifact(tmp_path / "p")
    loaded = baselines.load_method_artifact(tmp_path / "p", method.model)
    assert loaded.method == "prefix" and set(loaded.prefix.kv) == {"self"}
    with pytest.raises(ArtifactError, match="not an artifact"):
        baselines.load_method_artifact(tmp_path, method.model)


def test_adapters_survive_gradient_checkpointing(bpe_tokenizer):
    method = make("adapter", bpe_tokenizer, "llama", adapter_share=0.03)
    batch = batch_of(bpe_tokenizer)
    step(method, batch)  # make the up-projections non-zero so every gradient is
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(method.model)
        method.adapters.zero_grad()
        method.loss(batch).backward()
        grads.append([p.grad.clone() for p in method.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the trainer


def tensors_in(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return out


def _trainer(tmp_path, run: str, name: str, tokenizer, **overrides) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(out=str(tmp_path / run), method=name, batch_size=4, lr=1e-2,
                         max_steps=4, warmup_steps=1, dev_size=0, progress=False, seed=3,
                         **LIMITS, **overrides)  # fmt: skip
    return Trainer(config, PREFIX, model=tiny_llama(TOKENIZER_VOCAB), tokenizer=tokenizer,
                   train_examples=builtin_examples("train")[:12], dev_examples=[])  # fmt: skip


@pytest.mark.parametrize("name", METHODS)
def test_trainer_runs_each_method_and_resumes_bit_exactly(
    name, tmp_path, bpe_tokenizer, monkeypatch
):
    summary = _trainer(tmp_path, "straight", name, bpe_tokenizer).fit()
    crashing = _trainer(tmp_path, "resumed", name, bpe_tokenizer, checkpoint_every=2)
    original = crashing._train_step

    def crash_at_step_3(index):
        if index == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint
        return original(index)

    monkeypatch.setattr(crashing, "_train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    _trainer(tmp_path, "resumed", name, bpe_tokenizer, checkpoint_every=2, resume=True).fit()
    for part in ("checkpoint", "prefix"):
        straight = tensors_in(tmp_path / "straight" / part)
        resumed = tensors_in(tmp_path / "resumed" / part)
        assert straight and straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), f"{part}/{key}"
    assert summary["trainable_parameters"] > 0
    loaded = baselines.load_method_artifact(
        tmp_path / "resumed" / "prefix", tiny_llama(TOKENIZER_VOCAB)
    )
    assert loaded.method == name
