"""A KV cache that is written in place: one buffer per layer, sized for the whole generation.

`transformers`' DynamicLayer concatenates on every update, so each generated token copies the
whole cache of every layer (15% of a SmolLM2 decode step on CPU). `PreallocatedLayer` writes the
new keys/values into a buffer reserved up front and hands attention views of its used part.
It stays a DynamicLayer to the model (same masks, same `get_seq_length`), so nothing else in
the forward pass changes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from prefixtune.core.models import accepts_argument


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values live in a buffer of `capacity` positions.

    `keys`/`values` are views (B, H_kv, S, D) of the buffers' first S positions. Assigning
    them (a merge, a trim or a reorder elsewhere) adopts the tensor as the new buffer; when an
    update does not fit, the buffer is regrown to at least twice its size, so writes stay
    amortised O(new tokens).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None
        self._length = 0  # positions in use (keys and values agree after every update)
        self._value_length = 0  # values may be assigned apart from keys (one after the other)
        super().__init__()

    @property
    def keys(self) -> Tensor | None:
        buffer = self._key_buffer
        return None if buffer is None else buffer[:, :, : self._length]

    @keys.setter
    def keys(self, tensor: Tensor | None) -> None:
        self._key_buffer, self._length = _adopt(tensor)

    @property
    def values(self) -> Tensor | None:
        buffer = self._value_buffer
        return None if buffer is None else buffer[:, :, : self._value_length]

    @values.setter
    def values(self, tensor: Tensor | None) -> None:
        self._value_buffer, self._value_length = _adopt(tensor)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Write (B, H_kv, T, D) new keys/values after the cached ones; returns the views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        buffers = (self._key_buffer, self._value_buffer)
        if buffers[0] is None or end > min(b.shape[-2] for b in buffers):
            self._grow(key_states, value_states, end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._length = self._value_length = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep/reorder rows; the new buffers keep the old capacity."""
        if self._key_buffer is None:
            return
        index = beam_idx.to(self._key_buffer.device)
        length = self._length
        self._key_buffer = _select_rows(self._key_buffer, index, length)
        self._value_buffer = _select_rows(self._value_buffer, index, length)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(indices)

    def _grow(self, key_states: Tensor, value_states: Tensor, needed: int) -> None:
        """Move the cached positions into buffers of max(capacity, needed, 2 x current)."""
        old_keys, old_values = self._key_buffer, self._value_buffer
        current = 0 if old_keys is None else old_keys.shape[-2]
        size = max(self.capacity, needed, 2 * current)
        self._key_buffer = _empty_like(key_states, size)
        self._value_buffer = _empty_like(value_states, size)
        if old_keys is not None and self._length:
            self._key_buffer[:, :, : self._length] = old_keys[:, :, : self._length]
            self._value_buffer[:, :, : self._length] = old_values[:, :, : self._length]


def _adopt(tensor: Tensor | None) -> tuple[Tensor | None, int]:
    """An assigned tensor becomes the buffer (an empty one means nothing cached)."""
    if tensor is None or tensor.numel() == 0:
        return None, 0
    return tensor, tensor.shape[-2]


def _empty_like(states: Tensor, positions: int) -> Tensor:
    batch, heads, _, dim = states.shape
    return states.new_empty(batch, heads, positions, dim)


def _select_rows(buffer: Tensor, index: Tensor, length: int) -> Tensor:
    """Rows `index` of a (B, H, C, D) buffer; only the first `length` positions are copied."""
    selected = buffer.new_empty(len(index), *buffer.shape[1:])
    selected[:, :, :length] = buffer[:, :, :length].index_select(0, index)
    return selected


def preallocated_cache(config: PretrainedConfig, capacity: int) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers write in place into buffers of
    `capacity` positions (sliding-window and other special layers are left as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def plain_attention_layers(cache: DynamicCache) -> bool:
    """Every layer keeps every position of plain attention keys/values (no sliding windows, no
    linear-attention or convolution states): what seeding and packing rely on."""
    return bool(cache.layers) and all(
        type(layer) in (DynamicLayer, PreallocatedLayer) for layer in cache.layers
    )


def cache_kwargs(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """The keyword that hands `cache` to the model's forward: `cache` from transformers 5.24
    (which deprecates `past_key_values`, to be removed in 5.40, when an unknown keyword would
    be swallowed and our cache silently ignored), `past_key_values` before."""
    return {"cache" if accepts_argument(model, "cache") else "past_key_values": cache}
