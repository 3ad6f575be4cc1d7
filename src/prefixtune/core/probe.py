"""The probe behind `verify`: reference forwards with the model's original attention, the same inputs
through prefixtune's function, and the three checks (unchanged, in the path, faithful) with the
likely reason when one fails. See core/verify.py for what is checked per attention kind."""

from __future__ import annotations

from collections import Counter

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
from prefixtune.core.verdict import (
    IGNORED,
    PROBE_TOKENS,
    UnsupportedModelError,
    Verdict,
    model_type_of,
    relative_error,
    tolerance_for,
)


class CallCounts(dict):
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
                with_traits(
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
        # the reference numbers positions natively: no explicit position ids
        out = self.reference(lambda: self._decoder(ids, None, use_cache=True, native=True))
        ref = out.logits
        prefix = PrefixKV({"self": self._prefix_from_cache(out.past_key_values, "self", w_len)})
        capture = KVCapture(records=CallCounts())
        plain = self.prefixed(lambda: self._decoder(ids, capture).logits)
        got = self.prefixed(lambda: self._decoder(x_ids, prefix).logits)
        sites = self.check_in_path(capture)
        explicit = lambda: self.reference(lambda: self._decoder(ids, None).logits)  # noqa: E731
        unchanged = self.check_unchanged(plain, ref, explicit)
        faithful = self.check_faithful(
            "self", got, ref[:, w_len:], lambda: self._decoder(x_ids, None, offset=w_len).logits
        )
        return Verdict(self.model_type, self.tolerance, 0.0, unchanged, sites, {"self": faithful})

    def _run_encoder_decoder(self) -> Verdict:
        ids, w_len = self.ids, self.w_len
        src, y = ids[:, w_len:], ids[:, w_len:].flip(1)
        ref = self.reference(lambda: self._seq2seq(src, y))
        capture = KVCapture(records=CallCounts())
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

    def check_unchanged(self, plain: Tensor, reference: Tensor, explicit=None) -> float:
        """(a); `explicit` (decoder-only): the model's own attention given prefixtune's explicit
        position ids, to tell a position numbering of its own from an attention difference."""
        error = relative_error(plain, reference)
        if not error <= self.tolerance:  # also catches NaN
            reason = self._changed_reason()
            if explicit is not None and relative_error(plain, explicit()) <= self.tolerance:
                reason = (
                    "the family numbers positions its own way (e.g. from padding_idx + 1, as "
                    "RoBERTa does, or ignores position_ids): prefixtune's explicit position ids "
                    "(0-based, offset past the prefix) change the model"
                )
            self.fail(
                "(a) unchanged",
                f"without a prefix the logits through prefixtune's attention differ from the "
                f"model's own {self.original!r} attention by {error:.2e} (relative to the largest "
                f"logit; tolerance {self.tolerance:.0e})",
                reason,
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
                with_traits(
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
                f"({type(err).__name__}: {short_error(err)})",
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
                f"{short_error(err)})",
                "; ".join(reasons)
                if reasons
                else "an option of this family's attention that "
                "prefixtune's attention function does not support",
            )

    def _decoder(self, ids: Tensor, prefix_kv, use_cache: bool = False, offset: int = 0,
                 native: bool = False):  # fmt: skip
        """Decoder-only forward; positions start after the prefix, or at `offset` without one
        (`native`: no position ids given, the model numbers them itself)."""
        mask = torch.ones_like(ids)
        if native:
            return self.model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
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
            key, value = cached_kv(cache, layer)
            if key is None or key.shape[-2] < length:
                self.fail(
                    "probe",
                    f"transformers' KV cache holds no keys for {kind} layer {layer} of the "
                    f"{self.ids.shape[1]}-token probe",
                    "a layer without keys/values to prefix (recurrent, state-space or "
                    "linear attention) or a cache that drops tokens",
                )
            if key.shape != value.shape:
                self.fail(
                    "probe",
                    f"{kind} layer {layer} caches keys {tuple(key.shape)} and values "
                    f"{tuple(value.shape)} of different shapes",
                    "keys and values of different head sizes (e.g. multi-head latent attention "
                    "with a separate rotary part): a prefix holds one head size for both",
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
    if getattr(config, "relative_attention_num_buckets", None):
        traits.append("a relative position bias that has no entries for prefix keys")
    return traits


def with_traits(model: PreTrainedModel, reason: str) -> str:
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


def cached_kv(cache, layer: int) -> tuple[Tensor | None, Tensor | None]:
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


def short_error(err: Exception, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
