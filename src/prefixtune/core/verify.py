"""Refuse a model that prefixtune's attention would silently get wrong.

`enable_prefixes` switches a model's attention to the registered "prefixtune" function. That
switch can go wrong without any error: a family whose attention does not go through transformers'
attention interface keeps its own (a prefix is then ignored), a family whose attention needs
something the registered function does not pass on (attention sinks) is
changed even without a prefix, and a position scheme that biases each key by its distance (ALiBi)
cannot take prefix columns. So the first `enable_prefixes` on a model runs a probe of a few
tokens, one forward pass each, in eval mode without gradients (training mode is restored), and
refuses the model with `UnsupportedModelError` unless all three checks hold (a probe that cannot
run at all, e.g. keys and values of different head sizes, refuses it too):

(a) unchanged: without a prefix, the logits through prefixtune's attention equal those through
    the model's original implementation (e.g. "sdpa" or "eager") on the same token ids; for
    decoder-only models the reference numbers positions itself (no position ids given), so a
    family that numbers them its own way (RoBERTa: from padding_idx + 1) is refused too.
(b) in the path: every attention site `enable_prefixes` tagged is called through prefixtune's
    function with its `prefix_kv` keyword during that forward (calls are counted per site), and
    no two attention modules share a site (they would get the same prefix).
(c) faithful: a prefix holding the model's own keys/values of tokens w, read from transformers'
    OWN KV cache of a plain forward with the original implementation (not prefixtune's capture),
    makes the model on x equal the plain model on [w; x] (positions of x offset by len(w), as
    `prefixed_forward` does).

What is checked per attention kind:
    self     (decoder-only)     (a), (b), (c): x after w against the plain model on [w; x].
    encoder  (encoder-decoder)  (a), (b). No [w; x] reference: the encoder is bidirectional, so
                                w's keys in [w; x] depend on x.
    decoder  (encoder-decoder)  (a), (b). No [w; y] reference: the decoder numbers its learned
                                positions from its cache length, and prefixtune by design does
                                not shift encoder-decoder positions past a prefix.
    cross    (encoder-decoder)  (a), (b), (c): a cross prefix holding the cross keys/values of
                                encoder states h(w) (read from transformers' cross-attention
                                cache) equals cross-attending to the encoder states [h(w); h(x)];
                                cross keys carry no position, so this reference is exact.

Tolerance: the largest absolute logit difference divided by the largest absolute reference logit
must be at most 1e-4 in float32/float64, 1e-2 in float16 and 5e-2 in bfloat16 (the model's
parameter dtype). Families that pass are exact to ~1e-6 in float32.

The verdict is cached on the model object, so later `enable_prefixes` calls cost nothing. On a
refusal `enable_prefixes` restores the model's original attention, so the model is never left
changed. The only way past a refusal is explicit: PREFIXTUNE_UNVERIFIED=1 in the environment
turns it into a loud warning (logged, and raised as a `UserWarning` with the same message) and
keeps prefixtune's attention; the probe still runs, so the warning reports the numbers.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch
from transformers import PreTrainedModel

from prefixtune.core.attention import (
    ATTN_NAME,
)
from prefixtune.core.probe import Probe, model_traits, short_error
from prefixtune.core.verdict import (
    UNVERIFIED_ENV,
    UnsupportedModelError,
    Verdict,
    model_type_of,
    tolerance_for,
)

log = logging.getLogger(__name__)

VERDICT_ATTR = "_prefixtune_verdict"


def ensure_verified(model: PreTrainedModel, original: str) -> Verdict:
    """The model's cached verdict, or run the probe once (see the module docstring).

    Call with the model already switched to prefixtune's attention; `original` names the
    implementation it had before. Raises UnsupportedModelError unless PREFIXTUNE_UNVERIFIED=1.
    """
    verdict = getattr(model, VERDICT_ATTR, None)
    if verdict is not None:
        return verdict
    start = time.perf_counter()
    try:
        verdict = verify_model(model, original)
    except UnsupportedModelError as err:
        if os.environ.get(UNVERIFIED_ENV) != "1":
            raise
        message = f"{UNVERIFIED_ENV}=1: using a model prefixtune refused. {err}"
        log.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)
        verdict = Verdict(
            model_type_of(model), tolerance_for(model), time.perf_counter() - start,
            verified=False, problem=str(err),
        )  # fmt: skip
    setattr(model, VERDICT_ATTR, verdict)
    return verdict


@torch.no_grad()
def verify_model(model: PreTrainedModel, original: str) -> Verdict:
    """Run checks (a), (b), (c) on `model` (switched to prefixtune's attention) and return the
    verdict; raises UnsupportedModelError naming the failed check, by how much and why."""
    start = time.perf_counter()
    probe = Probe(model, original)
    modes = {module: module.training for module in model.modules()}  # per module: gradient
    model.eval()  # checkpointing sets `training` on some layers of an eval-mode model
    try:
        probe.check_sites()
        probe.check_switched()
        verdict = probe.run()
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - a probe that cannot run refuses the model
        probe.fail(
            "probe", f"the probe itself failed ({type(err).__name__}: {short_error(err)})",
            "; ".join(model_traits(model)) or "a layout prefixtune's prefixes cannot hold",
        )  # fmt: skip
    finally:
        model.set_attn_implementation(ATTN_NAME)
        for module, training in modes.items():
            module.training = training
    verdict = Verdict(**{**verdict.__dict__, "seconds": time.perf_counter() - start})
    log.info(
        "prefixtune verified %s in %.3fs: unchanged %.1e, faithful %s (tolerance %.0e)",
        verdict.model_type, verdict.seconds, verdict.unchanged,
        {k: f"{v:.1e}" for k, v in verdict.faithful.items()}, verdict.tolerance,
    )  # fmt: skip
    return verdict
