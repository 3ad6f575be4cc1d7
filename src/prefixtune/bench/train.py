"""Training-step workers of `prefixtune bench`: fixed-shape steps (prefixtune, PEFT, full
fine-tuning, the frozen forward+backward floor; optional gradient checkpointing) and the real
E2E workload. Each function runs one configuration inside its own worker process."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from prefixtune.bench import device as bench_device
from prefixtune.bench.common import (
    autocast,
    build_model,
    build_ours,
    build_peft,
    measure,
    peft_token_dim,
    rates,
    synthetic_batch,
)
from prefixtune.bench.flops import geometry, train_step_flops
from prefixtune.core.models import SHORT_DTYPE_NAMES
from prefixtune.core.runtime import autocast_dtype
from prefixtune.methods.objective import hidden_states, target_loss, target_positions
from prefixtune.training.weight_cast import frozen_weights_in

LR = 5e-5  # the paper's (and TrainConfig's) learning rate


def _mlp_shape(model, spec: dict[str, Any]) -> tuple[int, int, int] | None:
    if not spec.get("reparam"):
        return None
    from prefixtune.interop.peft import peft_shape

    shape = peft_shape(model.config)
    return peft_token_dim(model), spec["mlp_hidden"], shape.width


def _frozen_floor(model):
    """The frozen model's forward + activation-only backward: the embeddings' output is made a
    leaf that wants a gradient, so backward runs through every block and touches no weight."""
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_())


def _as_trainer_casts(spec: dict[str, Any], model):
    """Frozen weights in the autocast dtype, as Trainer.fit keeps them: for prefixtune and for
    the frozen floor (a naive frozen step could cast them just as well); PEFT runs as it comes."""
    frozen = spec["impl"] in ("ours", "frozen")
    return frozen_weights_in(model, autocast_dtype(spec["dtype"]) if frozen else None)


def _setup(spec: dict[str, Any], model, batch):
    """(loss function, trainable parameters) for one implementation; raises ValueError when the
    implementation refuses the configuration (PEFT prefix tuning + gradient checkpointing)."""
    from prefixtune.core.runtime import enable_gradient_checkpointing

    impl, ckpt = spec["impl"], spec.get("checkpointing", False)
    args = (spec["prefix_len"], spec["reparam"], spec["mlp_hidden"], spec.get("seed", 0))
    if impl == "ours":
        method = build_ours(model, *args)
        method.module.to(model.device)  # the encoder is built on the CPU
        if ckpt:
            enable_gradient_checkpointing(model)
        return (lambda: method.loss(batch)), list(method.parameters())
    if impl == "peft":
        if ckpt:
            enable_gradient_checkpointing(model)
        peft_model = build_peft(model, *args)  # PEFT 0.21 raises ValueError with checkpointing
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        return (lambda: peft_model(**batch).loss), trainable
    if impl not in ("finetune", "frozen"):
        raise ValueError(f"unknown training implementation {impl!r}")
    if impl == "finetune":
        model.requires_grad_(True)
    else:
        _frozen_floor(model)
    if ckpt:
        enable_gradient_checkpointing(model)

    def loss():
        return target_loss(model, hidden_states(model, batch), batch["labels"])

    return loss, [p for p in model.parameters() if p.requires_grad]


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step (forward, backward, AdamW) on a fixed B x T batch, timed on the
    spec's device (the CPU unless it names "cuda": bench/device.py)."""
    device = spec.get("device", "cpu")
    model, _ = build_model(spec["model"], seed=spec.get("seed", 0), device=device)
    batch = synthetic_batch(model.config.vocab_size, spec["batch"], spec["seq"],
                            target_tail=spec.get("target_tail", 0), seed=spec.get("seed", 0))  # fmt: skip
    batch = bench_device.on_device(batch, device)
    try:
        loss_fn, params = _setup(spec, model, batch)
    except ValueError as err:
        return {"refused": str(err)}
    if spec.get("fuse"):  # frozen Q/K/V and gate/up as one matmul each (core/fuse.py)
        from prefixtune.core.fuse import fuse_projections

        fuse_projections(model)
    if spec.get("compile"):
        from prefixtune.core.runtime import compiled

        loss_fn = compiled(loss_fn, torch.device(device))
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    last = {}

    def step() -> None:
        with autocast(spec["dtype"], device):
            loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        last["loss"] = float(loss.detach())

    with _as_trainer_casts(spec, model), bench_device.attention_kernels(device):
        result = bench_device.measure(device, step, spec["iters"], spec["warmup"])
    tokens = int(batch["attention_mask"].sum())
    targets = int(target_positions(model, batch["labels"])[0].sum())
    impl = spec["impl"]
    prefix = spec["prefix_len"] if impl in ("ours", "peft") else 0
    flops = train_step_flops(
        geometry(model.config), [spec["seq"]] * spec["batch"], targets, prefix,
        mlp=_mlp_shape(model, spec) if prefix else None, weight_grads=impl == "finetune",
    )  # fmt: skip
    return {
        **result,
        **rates(result, tokens),
        "tokens_per_step": tokens,
        "targets_per_step": targets,
        "trainable_parameters": sum(p.numel() for p in params),
        "loss": last.get("loss"),
        "useful_flops": flops,
    }


# ------------------------------------------------------------------------------ real workload


def _examples(count: int, seed: int):
    """`count` E2E training examples (the shared data), else the built-in toy set (CI)."""
    from prefixtune.data.builtin import builtin_examples
    from prefixtune.data.readers import load_examples, subsample
    from prefixtune.data.records import DataError

    try:
        examples, name = load_examples("e2e", "train"), "e2e/train"
    except DataError:
        examples, name = builtin_examples("train"), "builtin/train"
    count = min(count, len(examples))
    return subsample(examples, count, seed), name


def _pass_flops(model, items, spec) -> int:
    from prefixtune.data.encoding import IGNORE_INDEX

    geo = geometry(model.config)
    lengths = [len(item.input_ids) for item in items]
    targets = sum(sum(1 for t in item.labels[1:] if t != IGNORE_INDEX) for item in items)
    return train_step_flops(geo, lengths, targets, spec["prefix_len"],
                            mlp=_mlp_shape(model, spec))["total"]  # fmt: skip


def _train_config(spec: dict[str, Any], out: str):
    from prefixtune.config import TrainConfig

    return TrainConfig(data="e2e", out=out, dev_split="", batch_size=spec["batch"],
                       max_steps=10**6, autocast=SHORT_DTYPE_NAMES[spec["dtype"]], device="cpu",
                       progress=False, seed=spec.get("seed", 0), lr=LR,
                       compile=spec.get("compile", False))  # fmt: skip


def _ours_passes(spec, model, tokenizer, examples, out):
    """prefixtune as its Trainer runs: length-bucketed batches, target-only logits."""
    from prefixtune.config import PrefixConfig
    from prefixtune.training.trainer import Trainer

    prefix = PrefixConfig(length=spec["prefix_len"], reparam=spec["reparam"],
                          mlp_hidden=spec["mlp_hidden"], embed_dim=peft_token_dim(model))  # fmt: skip
    trainer = Trainer(_train_config(spec, out), prefix, model=model, tokenizer=tokenizer,
                      train_examples=examples, dev_examples=[])  # fmt: skip
    per_pass = trainer.batches.per_epoch
    lengths = trainer.batches.lengths  # input + label ids per item; input ids are half of it
    state = {"pass": 0, "tokens": 0, "padded": 0}

    def warm() -> None:  # compiled: a whole pass, so every shape is compiled before timing
        for step in range(per_pass if spec.get("compile") else 1):
            trainer._train_step(step)

    def one_pass() -> None:
        state["pass"] += 1
        tokens = 0
        for step in range(state["pass"] * per_pass, (state["pass"] + 1) * per_pass):
            tokens += trainer._train_step(step)[1]
        rows = trainer.batches._batches(state["pass"])  # this pass's batches (epoch = pass)
        state["tokens"] = tokens
        state["padded"] = sum(len(b) * max(lengths[i] for i in b) // 2 for b in rows)

    return trainer.batches.items, warm, one_pass, state, {"batches": per_pass}


def _peft_passes(spec, model, tokenizer, examples, out):
    """PEFT as its docs show: examples in order, padded to the batch's longest, full logits."""
    from prefixtune.data.encoding import collate
    from prefixtune.training.prepare import encode_examples
    from prefixtune.training.trainer import linear_schedule

    items = encode_examples(examples, model, tokenizer, _train_config(spec, out))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    size = spec["batch"]
    batches = [collate(items[i : i + size], pad) for i in range(0, len(items), size)]
    peft_model = build_peft(model, spec["prefix_len"], spec["reparam"], spec["mlp_hidden"],
                            spec.get("seed", 0))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    scheduler = linear_schedule(optimizer, 0, 10**6)
    state = {"tokens": 0, "padded": 0}

    def step(batch) -> None:
        with autocast(spec["dtype"]):
            loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def warm() -> None:
        step(batches[0])

    def one_pass() -> None:
        for batch in batches:
            step(batch)
        state["tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
        state["padded"] = sum(b["input_ids"].numel() for b in batches)

    return items, warm, one_pass, state, {"batches": len(batches)}


def run_real(spec: dict[str, Any]) -> dict[str, Any]:
    """Passes over the same E2E examples; tokens/s counts real (source + target) tokens."""
    model, tokenizer = build_model(spec["model"], seed=spec.get("seed", 0), tokenizer=True)
    examples, data_name = _examples(spec["examples"], spec.get("seed", 0))
    build = _ours_passes if spec["impl"] == "ours" else _peft_passes
    with tempfile.TemporaryDirectory(prefix="prefixtune-bench-") as out:
        items, warm, one_pass, state, info = build(spec, model, tokenizer, examples, out)
        with _as_trainer_casts(spec, model):
            result = measure(one_pass, spec["iters"], spec["warmup"], warm=warm)
    flops = _pass_flops(model, items, spec)
    return {
        **result,
        **rates(result, state["tokens"]),
        "data": data_name,
        "examples": len(examples),
        "tokens_per_pass": state["tokens"],
        "padded_tokens_per_pass": state["padded"],
        "useful_flops_per_pass": flops,
        **info,
    }


def run_equal_loss(spec: dict[str, Any]) -> dict[str, Any]:
    """prefixtune's and PEFT's loss on one batch with the same weights (sanity, not timed)."""
    import copy

    from prefixtune.bench.common import copy_peft_weights

    device = spec.get("device", "cpu")
    model, _ = build_model(spec["model"], seed=spec.get("seed", 0), device=device)
    batch = synthetic_batch(model.config.vocab_size, spec["batch"], spec["seq"], seed=1)
    batch = bench_device.on_device(batch, device)
    args = (spec["prefix_len"], spec["reparam"], spec["mlp_hidden"], spec.get("seed", 0))
    peft_model = build_peft(copy.deepcopy(model), *args)
    method = build_ours(model, *args)
    method.module.to(model.device)
    copy_peft_weights(method, peft_model)
    with torch.no_grad():
        ours, theirs = float(method.loss(batch)), float(peft_model(**batch).loss)
    return {"ours": ours, "peft": theirs, "abs_diff": abs(ours - theirs)}
