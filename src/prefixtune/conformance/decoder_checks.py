"""Checks (1)-(5) on a decoder-only model: the model under test runs prefixtune's attention,
`reference` (a copy taken before) its own; references are transformers' KV cache of a plain
forward, its forward on [w; x] and its `generate`."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from prefixtune.config import GenerateConfig
from prefixtune.conformance.common import artifact_round_trip, lm_loss, step_changes_only_prefix
from prefixtune.conformance.references import (
    generation_config,
    hf_generate,
    prefix_from_cache,
    probe_ids,
    self_cache,
    sites_of,
    vocab_of,
)
from prefixtune.conformance.results import GRAD_TOLERANCE, TOLERANCE, Check
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.prefix_encoder import PrefixEncoder, stack_flat
from prefixtune.core.probe import probe_lengths
from prefixtune.core.verdict import relative_error
from prefixtune.generation.engine import generate
from prefixtune.generation.prefill import left_pad

NEW_TOKENS = 6


def special_ids(model: PreTrainedModel) -> tuple[int, int]:
    """(eos, pad) token ids inside the vocabulary."""
    vocab, config = vocab_of(model), model.config.get_text_config()
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = config.pad_token_id
    eos = eos if isinstance(eos, int) and 0 <= eos < vocab else 2
    return eos, pad if isinstance(pad, int) and 0 <= pad < vocab else 0


@torch.no_grad()
def own_prefix(model: PreTrainedModel, reference: PreTrainedModel, w: Tensor) -> Tensor:
    """(L, 2, H_kv, len(w), D): transformers' own cache of the plain model's forward on w."""
    out = reference(input_ids=w, attention_mask=torch.ones_like(w), use_cache=True)
    prefix = prefix_from_cache(self_cache(out), sites_of(model, "self"), w.shape[1])
    if prefix is None:
        raise ValueError("transformers' cache holds no keys/values of w for some attention site")
    return prefix


def words(model: PreTrainedModel) -> tuple[Tensor, Tensor]:
    """(w, x) probe ids that fit every sliding window of the model."""
    w_len, x_len = probe_lengths(model)
    ids = probe_ids(w_len + x_len, vocab_of(model))
    return ids[:, :w_len], ids[:, w_len:]


@torch.no_grad()
def check_own_kv(model, reference, encoder) -> Check:
    """(1) own K/V: prefix of w's cached keys/values on x == the plain model on [w; x]."""
    w, x = words(model)
    prefix = PrefixKV({"self": own_prefix(model, reference, w)[None]})
    both = torch.cat([w, x], 1)
    ref = reference(input_ids=both, attention_mask=torch.ones_like(both)).logits[:, w.shape[1] :]
    got = prefixed_forward(model, x, torch.ones_like(x), prefix).logits
    error = relative_error(got, ref)
    note = f"len(w)={w.shape[1]}, len(x)={x.shape[1]}; logits relative to the largest"
    return Check("(1) own K/V", error <= TOLERANCE, error, TOLERANCE, note)


@torch.no_grad()
def check_mixed_batch(model, reference, encoder) -> Check:
    """(2) mixed batch: rows with different prefixes, left-padded == each row alone."""
    w, x = words(model)
    vocab, (_, pad) = vocab_of(model), special_ids(model)
    stack = [
        {"self": own_prefix(model, reference, w)},
        {"self": own_prefix(model, reference, probe_ids(max(w.shape[1] - 1, 1), vocab, 1))},
    ]
    lengths = [x.shape[1], max(x.shape[1] - 1, 1), max(x.shape[1] - 2, 1)]
    rows = [probe_ids(n, vocab, 3 + i)[0].tolist() for i, n in enumerate(lengths)]
    order = [1, 0, 1]
    padding = _batch_error(model, rows, pad, None, None)  # the plain model's own padding error
    note = f"3 rows of {lengths} tokens, left-padded"
    if padding > TOLERANCE:  # not prefixtune's doing: compare rows of one length instead
        rows = [probe_ids(lengths[0], vocab, 3 + i)[0].tolist() for i in range(3)]
        note = f"3 rows of {lengths[0]} tokens unpadded (the plain model alone changes {padding:.1e} under left padding)"
    error = _batch_error(model, rows, pad, stack, order)
    note += f", prefixes of {[s['self'].shape[-2] for s in stack]} tokens, rows use {order}"
    return Check("(2) mixed batch", error <= TOLERANCE, error, TOLERANCE, note)


def _batch_error(model, rows: list[list[int]], pad: int, stack, order) -> float:
    """Largest relative logit difference between a left-padded batch of `rows` (row i with
    prefix stack[order[i]], or none) and each row run alone."""
    ids, mask = left_pad(rows, pad)
    batch = PrefixKV.stack(stack, rows=torch.tensor(order)) if stack else None
    logits = prefixed_forward(model, ids, mask, batch).logits
    error = 0.0
    for i, row in enumerate(rows):
        alone_ids = torch.tensor([row])
        prefix = PrefixKV.stack([stack[order[i]]]) if stack else None
        alone = prefixed_forward(model, alone_ids, torch.ones_like(alone_ids), prefix).logits
        error = max(error, relative_error(logits[i : i + 1, -len(row) :], alone))
    return error


def _new_tokens(model: PreTrainedModel, used: int) -> int:
    """At most NEW_TOKENS, fewer where [w; x; new] would outgrow a sliding window (transformers'
    sliding cache would then drop w, while a prefix stays)."""
    config = model.config.get_text_config()
    room = NEW_TOKENS
    for name in ("sliding_window", "attention_chunk_size"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            room = min(room, limit - 1 - used)
    return max(room, 1)


def check_generation(model, reference, encoder) -> Check:
    """(3) generation: greedy and 3 beams with the prefix == transformers' generate on [w; x]."""
    w, x = words(model)
    eos, pad = special_ids(model)
    prefix = PrefixKV({"self": own_prefix(model, reference, w)[None]})
    new = _new_tokens(model, w.shape[1] + x.shape[1])
    notes, passed = [], True
    for beams in (1, 3):
        config = GenerateConfig(max_new_tokens=new, num_beams=beams)
        ours = generate(model, x, torch.ones_like(x), prefix, config,
                        eos_token_id=eos, pad_token_id=pad)[0]  # fmt: skip
        theirs = hf_generate(
            reference, generation_config(beams, new, eos, pad), ids=torch.cat([w, x], 1)
        )
        passed = passed and ours == theirs
        notes.append(f"{beams} beam(s): {ours}" + ("" if ours == theirs else f" != {theirs}"))
    return Check("(3) generation", passed, note="; ".join(notes))


def check_training(model, reference, encoder: PrefixEncoder) -> Check:
    """(4) training: gradient == autograd on the plain model with the prefix in its own cache."""
    _, x = words(model)
    x = torch.cat([x, probe_ids(2, vocab_of(model), 7)], 1)
    layers = sites_of(model, "self")
    part = encoder.parts["self"]
    encoder.zero_grad(set_to_none=True)
    prefix = encoder()
    lm_loss(prefixed_forward(model, x, torch.ones_like(x), prefix).logits, x).backward()
    grad = stack_flat(part.table.grad, part.shape)[0]  # (L, 2, H_kv, P, D)
    kv = prefix.kv["self"][0].detach().clone().requires_grad_(True)
    cache = DynamicCache(config=reference.config)
    for layer in layers:
        cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)
    mask = torch.ones(1, kv.shape[-2] + x.shape[1], dtype=torch.long)
    logits = reference(input_ids=x, attention_mask=mask, past_key_values=cache).logits
    lm_loss(logits, x).backward()
    error = relative_error(grad[layers], kv.grad[layers])
    grad_check = Check("(4) gradient", error <= GRAD_TOLERANCE, error, GRAD_TOLERANCE,
                       "prefix gradient against the plain model's autograd through its own "
                       "KV cache holding the prefix")  # fmt: skip
    step = step_changes_only_prefix(
        model, encoder, lambda: lm_loss(prefixed_forward(model, x, torch.ones_like(x),
                                                         encoder()).logits, x)
    )  # fmt: skip
    return _merge(grad_check, step)


def _merge(first: Check, second: Check) -> Check:
    passed = first.passed and second.passed
    return Check("(4) training", passed, first.error, first.tolerance,
                 f"{first.note} ({first.error:.1e}); {second.note}")  # fmt: skip


def check_artifact(model, reference, encoder: PrefixEncoder) -> Check:
    """(5) artifact: the folded prefix saved and loaded gives bit-identical logits."""
    _, x = words(model)
    family = str(model.config.model_type)
    return artifact_round_trip(
        encoder, lambda p: prefixed_forward(model, x, torch.ones_like(x), p).logits, family
    )


CHECKS = (check_own_kv, check_mixed_batch, check_generation, check_training, check_artifact)
