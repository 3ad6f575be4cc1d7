"""Refuse a model that prefixtune's attention would silently get wrong.

`enable_prefixes` switches a model's attention to the registered "prefixtune" function. That
switch can go wrong without any error: a family whose attention does not go through transformers'
attention interface keeps its own (a prefix is then ignored), a family whose attention needs
something the registered function does not pass on (attention sinks, logit soft-capping) is
changed even without a prefix, and a position scheme that biases each key by its distance (ALiBi)
cannot take prefix columns. So the first `enable_prefixes` on a model runs a probe of a few
tokens, one forward pass each, in eval mode without gradients (training mode is restored), and
refuses the model with `UnsupportedModelError` unless all three checks hold:

(a) unchanged: without a prefix, the logits through prefixtune's attention equal those through
    the model's original implementation (e.g. "sdpa" or "eager") on the same token ids.
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
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from prefixtune.core.attention import (
    ATTN_NAME,
    SITE_ATTR,
    KVCapture,
    PrefixKV,
    Site,
    position_ids_for,
)

log = logging.getLogger(__name__)

UNVERIFIED_ENV = "PREFIXTUNE_UNVERIFIED"
VERDICT_ATTR = "_prefixtune_verdict"
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_TOLERANCE = 1e-4  # float32 / float64
PROBE_TOKENS = 8  # len(w) + len(x), fewer where a sliding window or attention chunk is shorter
IGNORED = 1e-5  # a prefix that moves the logits by less than this (relative) is ignored


class UnsupportedModelError(ValueError):
    """prefixtune cannot attach prefixes to this model faithfully; the message says why."""

    def __init__(self, model_type: str, check: str, detail: str, reason: str) -> None:
        self.model_type, self.check, self.detail, self.reason = model_type, check, detail, reason
        super().__init__(
            f"model type {model_type!r} is not supported by prefixtune: check {check} failed: "
            f"{detail}. Likely reason: {reason}. Set {UNVERIFIED_ENV}=1 to use it anyway "
            "(prefixes may then be ignored or the base model changed)."
        )


@dataclass(frozen=True)
class Verdict:
    """The probe's result for one model (cached on it as `_prefixtune_verdict`).

    unchanged: (a) relative logit difference without a prefix; faithful: (c) relative difference
    per checked kind; sites: (b) attention sites seen calling prefixtune's function;
    verified: False only when PREFIXTUNE_UNVERIFIED=1 let a refused model through (`problem`).
    """

    model_type: str
    tolerance: float
    seconds: float
    unchanged: float = float("nan")
    sites: int = 0
    faithful: dict[str, float] = field(default_factory=dict)
    verified: bool = True
    problem: str | None = None


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


def model_type_of(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "model_type", None) or type(model).__name__)


def tolerance_for(model: PreTrainedModel) -> float:
    """The allowed relative logit difference for the model's parameter dtype."""
    return TOLERANCE.get(next(model.parameters()).dtype, DEFAULT_TOLERANCE)


def relative_error(got: Tensor, reference: Tensor) -> float:
    """max |got - reference| / max |reference| (in float32)."""
    got, reference = got.float(), reference.float()
    scale = reference.abs().max().clamp_min(1e-6)
    return float((got - reference).abs().max() / scale)


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


class _CallCounts(dict):
    """`KVCapture.records` that also counts how often each site records (once per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Site] = Counter()

    def __setitem__(self, site: Site, kv: tuple[Tensor, Tensor]) -> None:
        self.calls[site] += 1
        super().__setitem__(site, kv)


class Probe:
    """The probe of one model: reference forwards with the original attention implementation,
    then the same inputs through prefixtune's function."""

    def __init__(self, model: PreTrainedModel, original: str) -> None:
        self.model, self.original = model, original
        self.model_type = model_type_of(model)
        self.tolerance = tolerance_for(model)
        self.device = next(model.parameters()).device
        self.names: dict[Site, list[str]] = {}
        for name, module in model.named_modules():
            if hasattr(module, SITE_ATTR):
                self.names.setdefault(getattr(module, SITE_ATTR), []).append(name)
        self.sites = {site: names[0] for site, names in self.names.items()}
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.w_len, self.x_len = probe_lengths(model)
        vocab = model.get_input_embeddings().num_embeddings
        ids = 3 + (torch.arange(self.w_len + self.x_len) * 37 + 11) % max(vocab - 3, 1)
        self.ids = ids[None].to(self.device)  # (1, w + x); ids 0-2 are often pad/bos/eos

    # ------------------------------------------------------------------ the checks
    def check_sites(self) -> None:
        """Each attention module has a site of its own (else two would share one prefix)."""
        shared = {site: names for site, names in self.names.items() if len(names) > 1}
        if shared:
            site, names = next(iter(shared.items()))
            self.fail(
                "(b) in the path",
                f"{len(shared)} attention sites are claimed by more than one module, e.g. "
                f"{site.kind} layer {site.layer}: {', '.join(names)}, so they would get the "
                "same prefix",
                "prefixtune cannot tell this family's attention kinds apart (a cross-attention "
                "not named encoder_attn/cross, or modules numbered alike)",
            )

    def check_switched(self) -> None:
        """transformers declines to switch families that bypass its attention interface."""
        current = self.model.config._attn_implementation
        if current != ATTN_NAME:
            self.fail(
                "(b) in the path",
                f"the model still runs its {current!r} attention after switching to "
                f"{ATTN_NAME!r}, so no prefix would reach it",
                _with_traits(
                    self.model,
                    "attention bypasses transformers' attention interface (the family computes "
                    "attention itself and cannot switch implementations)",
                ),
            )

    def run(self) -> Verdict:
        if self.encoder_decoder:
            return self._run_encoder_decoder()
        return self._run_decoder_only()

    def _run_decoder_only(self) -> Verdict:
        ids, w_len = self.ids, self.w_len
        x_ids = ids[:, w_len:]
        out = self.reference(lambda: self._decoder(ids, None, use_cache=True))
        ref = out.logits
        prefix = PrefixKV({"self": self._prefix_from_cache(out.past_key_values, "self", w_len)})
        capture = KVCapture(records=_CallCounts())
        plain = self.prefixed(lambda: self._decoder(ids, capture).logits)
        got = self.prefixed(lambda: self._decoder(x_ids, prefix).logits)
        sites = self.check_in_path(capture)
        unchanged = self.check_unchanged(plain, ref)
        faithful = self.check_faithful(
            "self", got, ref[:, w_len:], lambda: self._decoder(x_ids, None, offset=w_len).logits
        )
        return Verdict(self.model_type, self.tolerance, 0.0, unchanged, sites, {"self": faithful})

    def _run_encoder_decoder(self) -> Verdict:
        ids, w_len = self.ids, self.w_len
        src, y = ids[:, w_len:], ids[:, w_len:].flip(1)
        ref = self.reference(lambda: self._seq2seq(src, y))
        capture = KVCapture(records=_CallCounts())
        plain = self.prefixed(lambda: self._seq2seq(src, y, prefix_kv=capture).logits)
        sites = self.check_in_path(capture)
        unchanged = self.check_unchanged(plain, ref.logits)
        faithful = {}
        if any(site.kind == "cross" for site in self.sites):
            faithful["cross"] = self._cross_faithful(ids[:, :w_len], y, ref)
        return Verdict(self.model_type, self.tolerance, 0.0, unchanged, sites, faithful)

    def _cross_faithful(self, w_src: Tensor, y: Tensor, ref) -> float:
        """(c) for cross-attention: a prefix of the cross keys/values of h(w) against the decoder
        cross-attending to [h(w); h(x)]."""
        h_x = ref.encoder_last_hidden_state  # (1, x, d)
        h_w = self.reference(lambda: self._encode(w_src))  # (1, w, d)
        both = self.reference(lambda: self._seq2seq(None, y, torch.cat([h_w, h_x], 1), True))
        kv = self._prefix_from_cache(both.past_key_values, "cross", w_src.shape[1])
        prefix = PrefixKV({"cross": kv})
        got = self.prefixed(lambda: self._seq2seq(None, y, h_x, prefix_kv=prefix).logits)
        return self.check_faithful(
            "cross", got, both.logits, lambda: self._seq2seq(None, y, h_x).logits
        )

    def check_unchanged(self, plain: Tensor, reference: Tensor) -> float:
        error = relative_error(plain, reference)
        if not error <= self.tolerance:  # also catches NaN
            self.fail(
                "(a) unchanged",
                f"without a prefix the logits through prefixtune's attention differ from the "
                f"model's own {self.original!r} attention by {error:.2e} (relative to the largest "
                f"logit; tolerance {self.tolerance:.0e})",
                self._changed_reason(),
            )
        return error

    def check_in_path(self, capture: KVCapture) -> int:
        calls = capture.records.calls
        missing = sorted((s for s in self.sites if calls[s] == 0), key=lambda s: (s.kind, s.layer))
        if missing:
            names = ", ".join(f"{self.sites[s]} ({s.kind} layer {s.layer})" for s in missing[:6])
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            self.fail(
                "(b) in the path",
                f"{len(missing)} of {len(self.sites)} attention sites never called "
                f"prefixtune's function with its prefix_kv keyword: {names}{more}",
                _with_traits(
                    self.model,
                    "attention bypasses transformers' attention interface (these modules compute "
                    "attention themselves or do not pass the forward's keyword arguments on), so "
                    "a prefix would be ignored there",
                ),
            )
        return len(self.sites)

    def check_faithful(self, kind: str, got: Tensor, reference: Tensor, without) -> float:
        error = relative_error(got, reference)
        if not error <= self.tolerance:
            moved = relative_error(self.prefixed(without), got)
            self.fail(
                "(c) faithful",
                f"a {kind} prefix holding the model's own keys/values of {self.w_len} tokens "
                f"differs from the model on those tokens followed by the input by {error:.2e} "
                f"(relative; tolerance {self.tolerance:.0e}); the prefix moves the logits by "
                f"{moved:.2e}",
                self._unfaithful_reason(moved),
            )
        return error

    # ------------------------------------------------------------------ forwards
    def reference(self, forward):
        """A forward with the model's original attention implementation."""
        self.model.set_attn_implementation(self.original)
        try:
            return forward()
        except Exception as err:  # noqa: BLE001 - any failure of the plain model refuses it
            self.fail(
                "probe", f"the plain model failed on a {self.ids.shape[1]}-token probe "
                f"({type(err).__name__}: {_short(err)})",
                "its forward does not take the inputs prefixtune gives it (explicit "
                "position_ids, a KV cache)",
            )  # fmt: skip
        finally:
            self.model.set_attn_implementation(ATTN_NAME)

    def prefixed(self, forward) -> Tensor:
        """A forward through prefixtune's attention."""
        try:
            return forward()
        except UnsupportedModelError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here refuses the model
            reasons = model_traits(self.model)
            self.fail(
                "probe",
                f"the model failed with prefixtune's attention ({type(err).__name__}: "
                f"{_short(err)})",
                "; ".join(reasons)
                if reasons
                else "an option of this family's attention that "
                "prefixtune's attention function does not support",
            )

    def _decoder(self, ids: Tensor, prefix_kv, use_cache: bool = False, offset: int = 0):
        """Decoder-only forward; positions start after the prefix, or at `offset` without one."""
        mask = torch.ones_like(ids)
        if isinstance(prefix_kv, PrefixKV):
            start = prefix_kv.row_lengths(ids.shape[0], ids.device)
        else:
            start = torch.full((ids.shape[0],), offset, dtype=torch.long, device=ids.device)
        extra = {} if prefix_kv is None else {"prefix_kv": prefix_kv}
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask, start),
            use_cache=use_cache, **extra,
        )  # fmt: skip

    def _encode(self, ids: Tensor) -> Tensor:
        encoder = self.model.get_encoder()
        return encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def _seq2seq(self, src, y, states=None, use_cache: bool = False, prefix_kv=None):
        """Encoder-decoder forward on source ids `src`, or on given encoder `states` (1, S, d)."""
        length = src.shape[1] if states is None else states.shape[1]
        inputs = {
            "attention_mask": torch.ones(1, length, dtype=torch.long, device=self.device),
            "decoder_input_ids": y,
            "use_cache": use_cache,
        }
        if states is None:
            inputs["input_ids"] = src
        else:
            inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=states)
        if prefix_kv is not None:
            inputs["prefix_kv"] = prefix_kv
        return self.model(**inputs)

    def _prefix_from_cache(self, cache, kind: str, length: int) -> Tensor:
        """(1, L, 2, H_kv, length, D): the first `length` cached positions of each `kind` site,
        read from transformers' own cache object."""
        if cache is not None and kind == "cross":
            cache = getattr(cache, "cross_attention_cache", None)
        elif cache is not None and hasattr(cache, "self_attention_cache"):
            cache = cache.self_attention_cache
        layers = sorted(s.layer for s in self.sites if s.kind == kind)
        per_layer = {}
        for layer in layers:
            key, value = _cached(cache, layer)
            if key is None or key.shape[-2] < length:
                self.fail(
                    "probe",
                    f"transformers' KV cache holds no keys for {kind} layer {layer} of the "
                    f"{self.ids.shape[1]}-token probe",
                    "a layer without keys/values to prefix (recurrent, state-space or "
                    "linear attention) or a cache that drops tokens",
                )
            per_layer[layer] = torch.stack([key[0, :, :length], value[0, :, :length]])
        template = next(iter(per_layer.values()))
        stack = [per_layer.get(i, torch.zeros_like(template)) for i in range(layers[-1] + 1)]
        return torch.stack(stack)[None]  # (1, L, 2, H_kv, P, D)

    # ------------------------------------------------------------------ reasons
    def _changed_reason(self) -> str:
        traits = model_traits(self.model)
        if traits:
            return "; ".join(traits)
        return (
            f"prefixtune's attention computes something other than the model's own "
            f"{self.original!r} attention (an option of this family it does not pass on)"
        )

    def _unfaithful_reason(self, moved: float) -> str:
        traits = model_traits(self.model)
        if moved < IGNORED:
            traits.insert(0, "the prefix is ignored: the attention never sees its keys/values")
        unprefixed = self._unprefixed_cache_layers()
        if unprefixed:
            traits.append(
                f"layers {unprefixed} keep keys/values in transformers' cache but prefixtune "
                "found no attention module there"
            )
        if traits:
            return "; ".join(traits)
        return (
            "positions cannot be offset past the prefix, or the keys in transformers' cache "
            "are not the keys attention sees"
        )

    def _unprefixed_cache_layers(self) -> list[int]:
        kind = "cross" if self.encoder_decoder else "self"
        layers = {s.layer for s in self.sites if s.kind == kind}
        total = getattr(self.model.config.get_text_config(), "num_hidden_layers", None)
        if self.encoder_decoder or not isinstance(total, int):
            return []
        return [i for i in range(total) if i not in layers]

    def fail(self, check: str, detail: str, reason: str):
        raise UnsupportedModelError(self.model_type, check, detail, reason)


def model_traits(model: PreTrainedModel) -> list[str]:
    """Features of a family known to defeat a plain prefix, as reasons for a refusal."""
    config = model.config.get_text_config()
    traits = []
    attn_config = getattr(config, "attn_config", None)
    if (
        getattr(config, "model_type", "") == "bloom"
        or getattr(config, "alibi", False) is True
        or getattr(attn_config, "alibi", False) is True
        or getattr(config, "position_embedding_type", None) == "alibi"
    ):
        traits.append("a position bias (ALiBi) that cannot take prefix columns")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        traits.append(
            "attention sinks (per-head sink logits) that prefixtune's attention function drops"
        )
    if getattr(config, "attn_logit_softcapping", None):
        traits.append("attention logit soft-capping, which prefixtune's SDPA path does not apply")
    if getattr(config, "relative_attention_num_buckets", None):
        traits.append("a relative position bias that has no entries for prefix keys")
    return traits


def _with_traits(model: PreTrainedModel, reason: str) -> str:
    """`reason`, followed by the family's known obstacles to a prefix, if any."""
    traits = model_traits(model)
    return reason if not traits else f"{reason}; it also has {'; '.join(traits)}"


def probe_lengths(model: PreTrainedModel) -> tuple[int, int]:
    """(len(w), len(x)): PROBE_TOKENS, or fewer so that [w; x] fits every sliding window or
    attention chunk and its cache (a sliding cache keeps window - 1 tokens)."""
    config = model.config.get_text_config()
    total = PROBE_TOKENS
    for name in ("sliding_window", "attention_chunk_size"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            total = min(total, limit - 1)
    total = max(total, 2)
    return total // 2, total - total // 2


def _cached(cache, layer: int) -> tuple[Tensor | None, Tensor | None]:
    """(keys, values) (1, H_kv, S, D) of one layer of a transformers cache, or (None, None)."""
    if cache is None:
        return None, None
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if layer >= len(layers):
            return None, None
        key, value = getattr(layers[layer], "keys", None), getattr(layers[layer], "values", None)
    else:
        try:
            key, value = cache[layer][0], cache[layer][1]
        except (IndexError, KeyError, TypeError):
            return None, None
    if not isinstance(key, Tensor) or key.dim() != 4 or key.numel() == 0:
        return None, None
    return key, value


def _short(err: Exception, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
