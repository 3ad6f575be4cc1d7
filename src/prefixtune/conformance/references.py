"""What the conformance checks compare against, computed by transformers itself with the model's
own attention implementation (never through prefixtune's attention function): its KV cache of a
plain forward, its encoder outputs and its `generate`."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from prefixtune.core.attention import SITE_ATTR, Site
from prefixtune.core.probe import cached_kv


def probe_ids(length: int, vocab: int, salt: int = 0) -> Tensor:
    """(1, length) deterministic token ids in 3..vocab-1 (ids 0-2 are often pad/bos/eos)."""
    ids = 3 + (torch.arange(length) * 37 + 11 + 13 * salt) % max(vocab - 3, 1)
    return ids[None]


def vocab_of(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().num_embeddings


def sites_of(model: PreTrainedModel, kind: str) -> list[int]:
    """Layers of the `kind` attention sites `enable_prefixes` tagged on `model`."""
    return sorted(
        site.layer
        for module in model.modules()
        if isinstance(site := getattr(module, SITE_ATTR, None), Site) and site.kind == kind
    )


def prefix_from_cache(cache, layers: list[int], length: int) -> dict[str, Tensor] | None:
    """(L, 2, H_kv, length, D) keys/values of the first `length` cached positions of `layers`
    (zeros for layers without a site), read from a transformers cache; None when a layer holds
    none."""
    per_layer = {}
    for layer in layers:
        key, value = cached_kv(cache, layer)
        if key is None or key.shape[-2] < length:
            return None
        per_layer[layer] = torch.stack([key[0, :, :length], value[0, :, :length]]).detach()
    template = next(iter(per_layer.values()))
    return torch.stack(
        [per_layer.get(i, torch.zeros_like(template)) for i in range(layers[-1] + 1)]
    )


def self_cache(out):
    """The self-attention part of a forward's cache (decoder-only: the cache itself)."""
    cache = out.past_key_values
    return getattr(cache, "self_attention_cache", cache)


def cross_cache(out):
    return getattr(out.past_key_values, "cross_attention_cache", None)


def encoder_states(model: PreTrainedModel, ids: Tensor) -> Tensor:
    """(1, S, d) encoder output of a plain forward."""
    encoder = model.get_encoder()
    return encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def generation_config(num_beams: int, new_tokens: int, eos: int, pad: int) -> GenerationConfig:
    """Plain greedy (num_beams 1) or beam search, nothing else switched on."""
    return GenerationConfig(
        do_sample=False, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=0,
        eos_token_id=eos, pad_token_id=pad, length_penalty=1.0, early_stopping=True,
        no_repeat_ngram_size=0, repetition_penalty=1.0,
    )  # fmt: skip


def hf_generate(model: PreTrainedModel, config: GenerationConfig, ids: Tensor | None = None,
                states: Tensor | None = None) -> list[int]:  # fmt: skip
    """transformers' own `generate` (with the cache it builds) on ids (decoder-only prompt or
    encoder input) or on given encoder `states` (1, S, d); the new ids up to EOS. `config` replaces
    the model's generation config for the call (no forced BOS/EOS or other family defaults: the
    engine under test gets the same plain settings)."""
    text = model.config.get_text_config()
    for name in ("decoder_start_token_id", "bos_token_id"):
        if getattr(config, name, None) is None and getattr(text, name, None) is not None:
            setattr(config, name, getattr(text, name))
    saved, model.generation_config = model.generation_config, config
    try:
        return _generate(model, config, ids, states)
    finally:
        model.generation_config = saved


def _generate(model, config: GenerationConfig, ids: Tensor | None, states: Tensor | None):
    if states is not None:
        mask = torch.ones(states.shape[:2], dtype=torch.long)
        out = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
            generation_config=config,
        )  # fmt: skip
        start = 1
    else:
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
        start = 1 if model.config.is_encoder_decoder else ids.shape[1]
    row = out[0, start:].tolist()
    return row[: row.index(config.eos_token_id)] if config.eos_token_id in row else row
