"""Switching a model's attention to prefixtune's, verified: the one entry point every path takes
(training, generation, serving, interop) before a prefix reaches a model."""

from __future__ import annotations

import threading

from transformers import PreTrainedModel

from prefixtune.core.attention import ATTN_NAME, register, tag_sites
from prefixtune.core.verdict import UnsupportedModelError, model_type_of
from prefixtune.core.verify import ensure_verified

ORIGINAL_ATTR = "_prefixtune_original_attn"


_ENABLE_LOCK = threading.RLock()


def enable_prefixes(model: PreTrainedModel) -> dict[str, int]:
    """Route the model's attention through `prefix_attention`; returns layers per attention kind.

    The first call on a model verifies it (`verify.ensure_verified`: without a prefix the model
    is unchanged, every attention site calls prefixtune's function, and a prefix of the model's
    own keys/values equals the model on those tokens) and caches the verdict on the model.
    Raises `verify.UnsupportedModelError` (a ValueError) naming the failed check, with the
    model's original attention restored; PREFIXTUNE_UNVERIFIED=1 downgrades that to a warning.
    """
    with _ENABLE_LOCK:  # one probe at a time: it switches the model's implementation back and forth
        register()
        layers = tag_sites(model)
        if not layers:
            raise UnsupportedModelError(
                model_type_of(model), "sites",
                f"{type(model).__name__} has no attention module (a class named *Attention with a "
                "layer_idx) to attach prefixes to",
                "no attention layers with keys/values (recurrent or state-space layers), or "
                "attention modules transformers does not number",
            )  # fmt: skip
        original = _original_attention(model)
        model.set_attn_implementation(ATTN_NAME)
        try:
            ensure_verified(model, original)
        except BaseException:
            model.set_attn_implementation(original)
            raise
    return layers


def _original_attention(model: PreTrainedModel) -> str:
    """The implementation the model had before prefixtune's (recorded on the model at the first
    switch; "eager", the model's own code, when it arrived already switched)."""
    original = getattr(model, ORIGINAL_ATTR, None)
    if original is None:
        current = model.config._attn_implementation
        original = current if current and current != ATTN_NAME else "eager"
        setattr(model, ORIGINAL_ATTR, original)
    return original
