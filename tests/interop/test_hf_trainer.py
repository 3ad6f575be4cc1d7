"""PrefixTuningModel under transformers.Trainer, TRL's SFTTrainer and accelerate: the same loss
as prefixtune's objective, Trainer == prefixtune's own trainer step for step on the same
batches, an SFTTrainer artifact that the server loads and chats with, an accelerate step."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from prefixtune.config import GenerateConfig, PrefixConfig, TrainConfig
from prefixtune.core.artifact import load_prefix
from prefixtune.core.attention import prefixed_forward
from prefixtune.core.models import model_id
from prefixtune.data.builtin import builtin_examples
from prefixtune.generation.engine import generate
from prefixtune.interop.hf_trainer import PrefixTuningModel
from prefixtune.methods.objective import count_tokens
from prefixtune.serving.app import ServeConfig, build_server, create_app
from prefixtune.training.prepare import prepare_data
from prefixtune.training.trainer import Trainer as PrefixtuneTrainer

from conftest import TOKENIZER_VOCAB, tiny_bart, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip
IDS = torch.tensor([[0, 0, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35]])  # row 0 left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
LABELS = torch.tensor([[-100, -100, -100, -100, 22, 23], [-100, -100, 32, 33, 34, 35]])


def wrapped(builder=tiny_gpt2, **options) -> PrefixTuningModel:
    torch.manual_seed(0)
    return PrefixTuningModel(builder(TOKENIZER_VOCAB), PrefixConfig(length=3), **options)


# ---------------------------------------------------------------------------- the module
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
def test_forward_is_prefixtunes_objective_and_prefixed_logits(builder):
    model = wrapped(builder)
    out = model(IDS, attention_mask=MASK, labels=LABELS)
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    assert torch.equal(out.loss, model.method.loss(batch))  # the trainer's loss, bit for bit
    # logits: another path, the model's own forward and head with the prefix injected and
    # real tokens at positions 3, 4, ... after the 3 prefix positions
    kv = model.method.prefix_kv()
    positions = ((MASK.cumsum(-1) - 1 + 3) * MASK).long()
    want = prefixed_forward(model.model, IDS, MASK, kv, position_ids=positions).logits
    real = MASK.bool()
    torch.testing.assert_close(out.logits[real], want[real], atol=1e-5, rtol=1e-5)
    # and the loss from those logits, by hand (HF's causal-LM convention: labels shift by one)
    lp = torch.log_softmax(want[:, :-1].float(), -1)
    target = LABELS[:, 1:]
    picked = lp.gather(-1, target.clamp(min=0)[..., None])[..., 0][target != -100]
    torch.testing.assert_close(out.loss, -picked.mean(), atol=1e-5, rtol=1e-5)


def test_only_the_prefix_trains_and_is_saved():
    model = wrapped()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prefix_encoder.") for n in trainable)
    assert set(model.state_dict()) == set(trainable)
    model.train()
    assert model.prefix_encoder.training and not model.model.training  # base dropout stays off
    other = wrapped()
    with torch.no_grad():
        for p in other.prefix_encoder.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model(IDS, MASK, LABELS).loss, other(IDS, MASK, LABELS).loss)


def test_encoder_decoder_loss_is_the_objective():
    model = wrapped(tiny_bart)
    out = model(IDS, attention_mask=MASK, labels=LABELS)
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    assert torch.equal(out.loss, model.method.loss(batch))
    assert out.logits.shape == (*LABELS.shape, TOKENIZER_VOCAB)


def test_packed_batches_and_unknown_inputs_are_refused():
    model = wrapped()
    with pytest.raises(ValueError, match="padding_free=False"):
        model(IDS[1:], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    with pytest.raises(ValueError, match="padding_free=False"):
        model(IDS, MASK, position_ids=torch.tensor([[0, 0, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5]]))
    # right padding restarts positions between a real token and a pad: not a packed row
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    padded = torch.tensor([[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5]])
    torch.testing.assert_close(model(IDS, right, position_ids=padded).logits,
                               model(IDS, right).logits)  # fmt: skip
    with pytest.raises(TypeError, match="cu_seq_lens_q"):
        model(IDS, MASK, cu_seq_lens_q=torch.tensor([0, 6]))
    # what trainers pass along is accepted: plain positions, use_cache, zero token types
    plain = model(IDS[1:], position_ids=torch.arange(6)[None], use_cache=False,
                  token_type_ids=torch.zeros(1, 6, dtype=torch.long)).logits  # fmt: skip
    torch.testing.assert_close(plain, model(IDS[1:]).logits)


def test_generate_is_the_engine_with_the_prefix():
    model = wrapped()
    config = GenerateConfig(max_new_tokens=5)
    want = generate(model.model, IDS, MASK, model.method.prefix_kv(), config,
                    eos_token_id=2, pad_token_id=0)  # fmt: skip
    assert model.generate(IDS, MASK, max_new_tokens=5, eos_token_id=2, pad_token_id=0) == want


def test_save_pretrained_writes_the_folded_artifact(tmp_path, bpe_tokenizer):
    model = wrapped(tokenizer=bpe_tokenizer)
    bpe_tokenizer.chat_template = CHAT_TEMPLATE
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        bpe_tokenizer.chat_template = None
    folded = load_prefix(tmp_path / "out")
    for kind, kv in model.prefix_encoder.bake().items():
        assert torch.equal(folded.kv[kind], kv)
    assert folded.meta["chat_template"] == CHAT_TEMPLATE
    assert folded.meta["base_model"] == model_id(model.model)
    assert folded.meta["prefix_config"]["length"] == 3
    assert not list((tmp_path / "out").glob("*.tmp*"))  # nothing half-written left behind


# ---------------------------------------------------------------------------- Trainer == ours
class FixedBatches(Trainer):
    """Trainer fed prefixtune's own micro-batches, in prefixtune's order (one dict per step)."""

    def __init__(self, *args, batches, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed = batches

    def get_train_dataloader(self) -> DataLoader:
        # one collated batch per item; a batch sampler lets a resumed run skip what it did
        return DataLoader(self.fixed, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_matches_prefixtunes_trainer_step_for_step(tmp_path, bpe_tokenizer, accum):
    """Matched: the same batches (prefixtune's length-bucketed Batches, collated), the same
    initial prefix (seed), AdamW (betas, eps defaults), lr with a linear decay to 0 and no
    warmup, no weight decay, gradient clipping at 1.0, fp32 (no autocast), one micro-batch per
    step or two accumulated (both average the micro-batches' means). Trainer's logged loss and
    prefixtune's log.jsonl loss agree at every step."""
    steps, lr = 6 // accum, 5e-3
    examples = builtin_examples("train")[:24]
    config = TrainConfig(data="builtin", out=str(tmp_path / "ours"), max_steps=steps,
                         batch_size=4, grad_accum=accum, lr=lr, weight_decay=0.0,
                         warmup_steps=0, grad_clip=1.0,
                         max_source_tokens=48, max_target_tokens=32,
                         autocast="float32", device="cpu", seed=3, log_every=1,
                         progress=False)  # fmt: skip
    prefix = PrefixConfig(length=4)
    torch.manual_seed(0)
    ours = PrefixtuneTrainer(config, prefix, model=tiny_gpt2(TOKENIZER_VOCAB),
                             tokenizer=bpe_tokenizer, train_examples=examples,
                             dev_examples=[])  # fmt: skip
    ours.fit()
    log = (tmp_path / "ours" / "log.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in log]
    our_losses = [r["loss"] for r in logged if "loss" in r]

    torch.manual_seed(0)
    model = PrefixTuningModel(tiny_gpt2(TOKENIZER_VOCAB), prefix, tokenizer=bpe_tokenizer,
                              seed=config.seed, return_logits=False)  # fmt: skip
    data = prepare_data(config, model.model, bpe_tokenizer, [], examples, [])
    batches = [data.batches.get(i) for i in range(steps * accum)]
    assert all(count_tokens(b)[1] > 0 for b in batches)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps, learning_rate=lr,
                             gradient_accumulation_steps=accum,
                             lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=config.seed)  # fmt: skip
    hf = FixedBatches(model=model, args=args, batches=batches)
    hf.train()
    hf_losses = [r["loss"] for r in hf.state.log_history if "loss" in r]

    assert len(our_losses) == len(hf_losses) == steps
    assert our_losses[-1] < our_losses[0]  # it trains
    assert hf_losses == pytest.approx(our_losses, rel=1e-5, abs=1e-6)
    for name, ours_p in ours.method.module.state_dict().items():
        torch.testing.assert_close(model.prefix_encoder.state_dict()[name], ours_p,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
    # Trainer's own save_model ends in prefixtune's artifact, equal to prefixtune's
    hf.save_model(str(tmp_path / "hf-final"))
    theirs, mine = load_prefix(tmp_path / "hf-final"), load_prefix(tmp_path / "ours" / "prefix")
    for kind in mine.kv:
        torch.testing.assert_close(theirs.kv[kind], mine.kv[kind], atol=1e-5, rtol=1e-4)


def test_trainer_checkpoints_resume_the_prefix(tmp_path):
    """Trainer's checkpoint holds the artifact and the encoder; resuming continues it."""
    model = wrapped(return_logits=False)
    batches = [{"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}] * 4
    options = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps",
                   report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1)  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "a"), **options)
    FixedBatches(model=model, args=args, batches=batches).train()
    assert load_prefix(tmp_path / "a" / "checkpoint-2").length == 3
    again = wrapped(return_logits=False)
    args = TrainingArguments(output_dir=str(tmp_path / "a"), **options)
    FixedBatches(model=again, args=args, batches=batches).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))  # fmt: skip
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value)


def test_trainer_label_smoothing_uses_the_logits(tmp_path):
    """Trainer's label smoother takes the logits (labels popped): the prefix still trains."""
    model = wrapped()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-2,
                             label_smoothing_factor=0.1, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True)  # fmt: skip
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    FixedBatches(model=model, args=args, batches=[batch]).train()
    assert all(not torch.equal(before[n], p) for n, p in model.state_dict().items())


# ---------------------------------------------------------------------------- accelerate
def test_accelerate_loop_trains_a_step():
    from accelerate import Accelerator

    model = wrapped(return_logits=False)
    frozen = {n: p.clone() for n, p in model.model.named_parameters()}
    before = {n: p.clone() for n, p in model.state_dict().items()}
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader([{"input_ids": i, "attention_mask": m, "labels": la}
                         for i, m, la in zip(IDS, MASK, LABELS, strict=True)], batch_size=2)  # fmt: skip
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    assert all(not torch.equal(before[n], p) for n, p in unwrapped.state_dict().items())
    assert all(torch.equal(frozen[n], p) for n, p in unwrapped.model.named_parameters())


# ---------------------------------------------------------------------------- TRL SFTTrainer
def chat_rows(n: int) -> list[dict]:
    examples = builtin_examples("train")[:n]
    return [{"messages": [{"role": "user", "content": e.source},
                          {"role": "assistant", "content": e.target}]} for e in examples]  # fmt: skip


def test_sft_trainer_artifact_serves_a_chat_completion(tmp_path, model_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = PrefixTuningModel.from_pretrained(str(model_dir), PrefixConfig(length=4), seed=0)
    tokenizer = model.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    before = {n: p.clone() for n, p in model.state_dict().items()}
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, max_length=96, disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_rows(8)),
                         processing_class=tokenizer)  # fmt: skip
    # TRL's fused LM head runs model.base_model (the backbone with the prefix in front): the
    # same loss as prefixtune's objective on a batch of its own collator
    batch = next(iter(trainer.get_train_dataloader()))
    fused = model(**batch, fused_lm_head=True).loss
    torch.testing.assert_close(fused, model(**batch).loss, atol=1e-5, rtol=1e-5)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
    out = tmp_path / "chat-prefix"
    trainer.save_model(str(out))

    # the server loads the model directory (no chat template) and the prefix (carries one)
    server = build_server(ServeConfig(model=str(model_dir), prefixes=str(out), device="cpu",
                                      max_wait_ms=5, max_input_tokens=200,
                                      max_new_tokens_limit=16))  # fmt: skip
    assert not server.tokenizer.chat_template
    messages = [{"role": "user", "content": builtin_examples("dev")[0].source}]

    async def ask():
        app = create_app(server)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                body = {"model": out.name, "messages": messages, "max_tokens": 8, "temperature": 0}
                return await asyncio.wait_for(c.post("/v1/chat/completions", json=body), 60)

    reply = asyncio.run(ask())
    assert reply.status_code == 200, reply.text
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    new = model.generate(ids, max_new_tokens=8)[0]  # the trained prefix, decoded directly
    assert reply.json()["choices"][0]["message"]["content"] == tokenizer.decode(
        new, skip_special_tokens=True)  # fmt: skip
