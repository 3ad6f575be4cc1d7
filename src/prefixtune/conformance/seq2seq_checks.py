"""Checks (1)-(5) on an encoder-decoder model. (1) and (3) for the cross kind (a clean reference:
cross keys/values of encoder states h(w) == cross-attending to [h(w); h(x)]); (2), (4), (5) with
a prefix on every kind the model has (encoder, decoder, cross). Sources are right-padded: models
with learned encoder positions number them by index, so left padding alone would change them."""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from prefixtune.config import GenerateConfig
from prefixtune.conformance.common import artifact_round_trip, lm_loss, step_changes_only_prefix
from prefixtune.conformance.decoder_checks import special_ids
from prefixtune.conformance.references import (
    cross_cache,
    encoder_states,
    generation_config,
    hf_generate,
    prefix_from_cache,
    probe_ids,
    sites_of,
    vocab_of,
)
from prefixtune.conformance.results import TOLERANCE, Check
from prefixtune.core.attention import PrefixKV
from prefixtune.core.prefix_encoder import PrefixEncoder
from prefixtune.core.verdict import relative_error
from prefixtune.generation.engine import generate

W_LEN, X_LEN, Y_LEN, NEW_TOKENS = 4, 5, 4, 6
FD_TOLERANCE, FD_STEP = 1e-5, 1e-6  # float64: measured ~1e-7 on BART


def _inputs(model: PreTrainedModel) -> tuple[Tensor, Tensor, Tensor]:
    """(w, x, y): prefix words, source and decoder input ids (y starts with the start token)."""
    vocab = vocab_of(model)
    start = model.config.decoder_start_token_id
    start = start if isinstance(start, int) and start < vocab else 0
    y = torch.cat([torch.tensor([[start]]), probe_ids(Y_LEN - 1, vocab, 9)], 1)
    return probe_ids(W_LEN, vocab, 0), probe_ids(X_LEN, vocab, 2), y


def _run(model, x: Tensor, mask: Tensor, y: Tensor, prefix) -> Tensor:
    return model(input_ids=x, attention_mask=mask, decoder_input_ids=y, prefix_kv=prefix).logits


@torch.no_grad()
def cross_prefix(model, reference, w: Tensor, h_x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(cross prefix (L, 2, H, len(w), D) from transformers' cross cache, reference logits)."""
    states = torch.cat([encoder_states(reference, w), h_x], 1)
    out = reference(
        encoder_outputs=BaseModelOutput(last_hidden_state=states),
        attention_mask=torch.ones(states.shape[:2], dtype=torch.long),
        decoder_input_ids=y, use_cache=True,
    )  # fmt: skip
    prefix = prefix_from_cache(cross_cache(out), sites_of(model, "cross"), w.shape[1])
    if prefix is None:
        raise ValueError("transformers' cross-attention cache holds no keys/values of h(w)")
    return prefix, out.logits


@torch.no_grad()
def check_own_kv(model, reference, encoder) -> Check:
    """(1) own K/V: cross prefix of h(w) == cross-attending to [h(w); h(x)]."""
    if not sites_of(model, "cross"):
        return Check("(1) own K/V", True, note="no cross-attention: no clean reference")
    w, x, y = _inputs(model)
    h_x = encoder_states(reference, x)
    prefix, ref = cross_prefix(model, reference, w, h_x, y)
    got = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=h_x),
        attention_mask=torch.ones_like(x), decoder_input_ids=y,
        prefix_kv=PrefixKV({"cross": prefix[None]}),
    ).logits  # fmt: skip
    error = relative_error(got, ref)
    note = "cross kind (encoder/decoder kinds have no [w; x] reference)"
    return Check("(1) own K/V", error <= TOLERANCE, error, TOLERANCE, note)


@torch.no_grad()
def check_mixed_batch(model, reference, encoder: PrefixEncoder) -> Check:
    """(2) mixed batch: rows with different prefixes (every kind) == each row alone."""
    _, _, y = _inputs(model)
    vocab, (_, pad) = vocab_of(model), special_ids(model)
    first = encoder.bake()
    torch.manual_seed(1)
    second = {k: torch.randn_like(t[..., :1, :]).repeat_interleave(3, -2) * t.std()
              for k, t in first.items()}  # fmt: skip
    stack, order = [first, second], [1, 0, 1]
    lengths = [X_LEN, X_LEN - 1, X_LEN - 3]
    rows = [probe_ids(n, vocab, 3 + i)[0].tolist() for i, n in enumerate(lengths)]
    padding = _batch_error(model, rows, pad, y, None, None)  # the plain model's own
    note = f"kinds {sorted(first)}; sources of {lengths} tokens, right-padded"
    if padding > TOLERANCE:  # not prefixtune's doing: compare sources of one length instead
        rows = [probe_ids(X_LEN, vocab, 3 + i)[0].tolist() for i in range(3)]
        note = (f"kinds {sorted(first)}; 3 sources of {X_LEN} tokens unpadded (the plain "
                f"model alone changes {padding:.1e} under padding)")  # fmt: skip
    error = _batch_error(model, rows, pad, y, stack, order)
    return Check("(2) mixed batch", error <= TOLERANCE, error, TOLERANCE, note)


def _batch_error(model, rows: list[list[int]], pad: int, y: Tensor, stack, order) -> float:
    """Largest relative logit difference between a right-padded batch of sources `rows` (row i
    with prefix stack[order[i]], or none) and each row run alone."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    prefix = PrefixKV.stack(stack, torch.tensor(order)) if stack else None
    batch = _run(model, ids, mask, y.expand(len(rows), -1), prefix)
    error = 0.0
    for i, row in enumerate(rows):
        alone_ids = torch.tensor([row])
        alone_prefix = PrefixKV.stack([stack[order[i]]]) if stack else None
        alone = _run(model, alone_ids, torch.ones_like(alone_ids), y, alone_prefix)
        error = max(error, relative_error(batch[i : i + 1], alone))
    return error


def check_generation(model, reference, encoder) -> Check:
    """(3) generation: greedy and 3 beams with a cross prefix == transformers' generate on
    encoder states [h(w); h(x)]."""
    if not sites_of(model, "cross"):
        return Check("(3) generation", True, note="no cross-attention: no clean reference")
    w, x, y = _inputs(model)
    eos, pad = special_ids(model)
    with torch.no_grad():
        h_x = encoder_states(reference, x)
        states = torch.cat([encoder_states(reference, w), h_x], 1)
        prefix = PrefixKV({"cross": cross_prefix(model, reference, w, h_x, y)[0][None]})
    notes, passed = [], True
    for beams in (1, 3):
        config = GenerateConfig(max_new_tokens=NEW_TOKENS, num_beams=beams)
        ours = generate(model, x, torch.ones_like(x), prefix, config,
                        eos_token_id=eos, pad_token_id=pad)[0]  # fmt: skip
        theirs = hf_generate(reference, generation_config(beams, NEW_TOKENS, eos, pad),
                             states=states)  # fmt: skip
        passed = passed and ours == theirs
        notes.append(f"{beams} beam(s): {ours}" + ("" if ours == theirs else f" != {theirs}"))
    return Check("(3) generation", passed, note="; ".join(notes) + " (cross kind)")


def check_training(model, reference, encoder: PrefixEncoder) -> Check:
    """(4) training: autograd == central finite differences in float64 (every kind), and a
    step changes only the prefix."""
    _, x, y = _inputs(model)
    mask = torch.ones_like(x)
    model64, encoder64 = copy.deepcopy(model).double(), copy.deepcopy(encoder).double()

    def loss64() -> Tensor:
        return lm_loss(_run(model64, x, mask, y, encoder64()), y)

    params = list(encoder64.parameters())
    for p in params:
        p.grad = None
    loss64().backward()
    torch.manual_seed(2)
    direction = [torch.randn_like(p) for p in params]
    slope = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * FD_STEP * d)
            values.append(float(loss64()))
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * FD_STEP * d)
    numeric = (values[0] - values[1]) / (2 * FD_STEP)
    error = abs(slope - numeric) / max(abs(numeric), 1e-12)
    step = step_changes_only_prefix(model, encoder,
                                    lambda: lm_loss(_run(model, x, mask, y, encoder()), y))  # fmt: skip
    note = (f"kinds {sorted(encoder.parts)}: directional derivative {slope:.6e} vs central "
            f"difference {numeric:.6e} (float64); {step.note}")  # fmt: skip
    return Check("(4) training", error <= FD_TOLERANCE and step.passed, error, FD_TOLERANCE, note)


def check_artifact(model, reference, encoder: PrefixEncoder) -> Check:
    """(5) artifact: the folded prefix saved and loaded gives bit-identical logits."""
    _, x, y = _inputs(model)
    return artifact_round_trip(
        encoder, lambda p: _run(model, x, torch.ones_like(x), y, p), str(model.config.model_type)
    )


CHECKS = (check_own_kv, check_mixed_batch, check_generation, check_training, check_artifact)
