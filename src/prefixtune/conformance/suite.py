"""The conformance suite: run on any model (a fresh instance, tiny or real), it checks that
prefixtune's prefixes do on it exactly what the paper's prefixes mean, against references that
transformers computes with the model's own attention.

    (1) own K/V     a prefix holding the model's own keys/values of words w (read from
                    transformers' KV cache of a plain forward on w) makes the model on x equal the
                    plain model on [w; x]: logits, relative error <= TOLERANCE.
    (2) mixed batch a left-padded batch whose rows use different prefixes (different lengths)
                    equals each row run alone: logits at real tokens, relative <= TOLERANCE.
    (3) generation  greedy and 3-beam decoding with prefixtune's engine and the prefix of (1)
                    produce exactly the tokens of transformers' own `generate` on [w; x].
    (4) training    one step changes only the prefix (every base weight bit-identical) and its
                    gradient matches autograd on the plain model with the prefix placed in its
                    own KV cache (decoder-only), or central finite differences in float64
                    (encoder-decoder): relative <= GRAD_TOLERANCE.
    (5) artifact    the folded prefix saved and loaded gives bit-identical logits.

Encoder-decoder models: (1) and (3) for the cross kind only (cross keys carry no position, so
cross keys/values of encoder states h(w) equal cross-attending to [h(w); h(x)]); the encoder
and decoder kinds have no clean [w; x] reference (the encoder is bidirectional, so w's keys
depend on x; the decoder does not offset its positions past a prefix). (2), (4), (5) cover
every kind.

A model prefixtune refuses (`UnsupportedModelError` from `enable_prefixes`) is reported as
refused with the reason; the suite never runs checks on it.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import PreTrainedModel

from prefixtune.config import PrefixConfig
from prefixtune.conformance import decoder_checks, seq2seq_checks
from prefixtune.conformance.results import Check, Report
from prefixtune.core.attention import ATTN_NAME, tag_sites
from prefixtune.core.injection import ORIGINAL_ATTR
from prefixtune.core.prefix_encoder import build_encoder
from prefixtune.core.verdict import UnsupportedModelError

PREFIX_LENGTH = 2


def attention_kinds(model: PreTrainedModel) -> dict[str, int]:
    """Attention kind -> layers prefixtune finds in the model (tags the modules, nothing else)."""
    return tag_sites(model)


def run_suite(model: PreTrainedModel, family: str | None = None, seed: int = 0) -> Report:
    """Run checks (1)-(5) on `model` (in float32, eval mode; its attention not yet switched).

    The model is switched to prefixtune's attention (verified by `enable_prefixes`); a deep copy
    taken before keeps the model's own attention as the reference (switched back to it if the
    model arrived switched already).
    """
    start = time.perf_counter()
    family = family or str(getattr(model.config, "model_type", type(model).__name__))
    model = model.float().eval()
    reference = copy.deepcopy(model).requires_grad_(False)
    if reference.config._attn_implementation == ATTN_NAME:  # already switched: undo on the copy
        reference.set_attn_implementation(getattr(model, ORIGINAL_ATTR, None) or "eager")
    kinds = attention_kinds(copy.deepcopy(model))
    try:
        torch.manual_seed(seed)
        encoder = build_encoder(model, PrefixConfig(length=PREFIX_LENGTH, reparam=False))
    except UnsupportedModelError as err:
        detail = err.detail if len(err.detail) <= 240 else err.detail[:237] + "..."
        reason = f"{err.check}: {err.reason} [{detail}]"
        return Report(family, "refused", kinds, reason, [], time.perf_counter() - start)
    module = seq2seq_checks if model.config.is_encoder_decoder else decoder_checks
    checks = []
    for check in module.CHECKS:
        try:
            checks.append(check(model, reference, encoder))
        except Exception as err:  # noqa: BLE001 - a check that crashes has failed
            name = check.__doc__.split(":")[0] if check.__doc__ else check.__name__
            checks.append(Check(name, False, note=f"raised {type(err).__name__}: {err}"[:300]))
    failed = [c for c in checks if not c.passed]
    status = "failing" if failed else "pass"
    reason = "; ".join(f"{c.name}: {c.note}" for c in failed)
    return Report(family, status, kinds, reason, checks, time.perf_counter() - start)
