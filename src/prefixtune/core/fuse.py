"""Fused frozen projections: Q/K/V in one matmul, gate/up in one (Llama-family blocks).

A Llama-style block feeds one tensor to three sibling projections (`q_proj`, `k_proj`, `v_proj`)
and another to two (`gate_proj`, `up_proj`). With frozen weights these can run as one wider
matmul: `fuse_projections(model)` concatenates each group's weights ONCE into a fused copy and
replaces the siblings' `forward` (an instance attribute; the modules stay `nn.Linear`, their
parameters, `state_dict` and saving are untouched) with a thin view:

    the first sibling called with an input x computes y = x @ [Wq; Wk; Wv]^T (+ bias) once,
    returns its slice and keeps the other slices for its siblings; a sibling called with the
    very same tensor object x (same version counter, same grad/inference/autocast mode) takes
    its slice, once; the group forgets x and y as soon as every slice was taken.

Every other call recomputes: a different input, an input modified in place, a slice already
taken (the same x passed twice), a change of grad mode. So the reuse is exact under autograd
(the slices are views of y, whose graph leads back to x), under torch.no_grad, and under gradient
checkpointing (a recomputed layer sees new tensors, so it computes afresh); nothing carries over
from one forward to the next (inference tensors carry no version counter: an in-place change of
x between siblings inside torch.inference_mode goes unseen; no model block does that). Held per thread (a server's worker thread and a test's thread never
share a pending product).

The fused copy follows the originals: it is rebuilt on the next forward whenever a sibling's
weight or bias changes storage, version, dtype or device (`model.to(...)`, `load_state_dict`,
training/weight_cast.py's bf16 swap). Frozen weights only: a sibling whose weight or bias
requires a gradient is refused (fine-tuning and adapter methods train them).

Decoder-only models only: an encoder-decoder model (BART, T5) is refused, since its
cross-attention feeds `q_proj` the decoder states and `k_proj`/`v_proj` the encoder's, so no
product would ever be shared (three matmuls of the fused width each call instead of one).

Memory: the fused copy holds the grouped weights once more (for SmolLM2-135M about 2/3 of the
non-embedding weights); `unfuse_projections` drops it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefixtune.config import ConfigError
from prefixtune.core.models import is_encoder_decoder

GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling Linear modules fed the same input in Llama-family blocks (GPT-2's c_attn is fused)."""


class _Pending:
    """The last fused product of one thread: its input, mode, slices and which were taken."""

    __slots__ = ("x", "version", "mode", "parts", "taken")

    def __init__(self, x: Tensor, mode: tuple, parts: tuple[Tensor, ...]) -> None:
        self.x, self.version, self.mode, self.parts = x, _version(x), mode, parts
        self.taken = [False] * len(parts)


def _version(x: Tensor) -> int:
    """The in-place version counter (inference tensors have none: -1)."""
    return -1 if x.is_inference() else x._version


def _mode(x: Tensor) -> tuple:
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else None
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, dtype


def _state(tensor: Tensor | None) -> tuple | None:
    if tensor is None:
        return None
    return tensor.data_ptr(), _version(tensor), tensor.dtype, tensor.device, tensor.requires_grad


class FusedGroup:
    """One fused weight over sibling nn.Linear modules, and each thread's pending product."""

    def __init__(self, modules: list[nn.Linear], names: list[str]) -> None:
        self.modules, self.names = modules, names
        self.splits = [m.out_features for m in modules]
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.key: tuple | None = None
        self.pending: dict[int, _Pending] = {}

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles rebuild the fused copy
        return {"modules": self.modules, "names": self.names, "splits": self.splits,
                "weight": None, "bias": None, "key": None, "pending": {}}  # fmt: skip

    def fused(self) -> tuple[Tensor, Tensor | None]:
        """The fused (sum of out_features, in_features) weight and bias, rebuilt if stale."""
        key = tuple((_state(m.weight), _state(m.bias)) for m in self.modules)
        if key != self.key:
            check_frozen(self.modules, self.names)
            with torch.inference_mode(False), torch.no_grad():  # usable later under autograd
                self.weight = torch.cat([m.weight.detach() for m in self.modules])
                self.bias = None
                if any(m.bias is not None for m in self.modules):
                    self.bias = torch.cat([
                        m.bias.detach() if m.bias is not None
                        else m.weight.new_zeros(m.out_features) for m in self.modules
                    ])  # fmt: skip
            self.key = key
        return self.weight, self.bias

    def output(self, index: int, x: Tensor) -> Tensor:
        """Sibling `index`'s projection of x: a slice of one fused matmul per input."""
        thread, mode = threading.get_ident(), _mode(x)
        pending = self.pending.get(thread)
        if (pending is not None and pending.x is x and pending.version == _version(x)
                and pending.mode == mode and not pending.taken[index]):  # fmt: skip
            pending.taken[index] = True
            part = pending.parts[index]
            if all(pending.taken):
                del self.pending[thread]
            return part
        weight, bias = self.fused()
        parts = F.linear(x, weight, bias).split(self.splits, dim=-1)  # (..., out_i) views
        self.pending[thread] = fresh = _Pending(x, mode, parts)
        fresh.taken[index] = True
        return parts[index]


class _SliceForward:
    """A sibling's forward: its slice of the group's fused product."""

    def __init__(self, group: FusedGroup, index: int) -> None:
        self.group, self.index = group, index

    def __call__(self, x: Tensor) -> Tensor:
        return self.group.output(self.index, x)


def check_frozen(modules: list[nn.Linear], names: list[str]) -> None:
    """Refuse weights that train: fusing copies them, so their updates would be lost."""
    for module, name in zip(modules, names, strict=True):
        for param in (module.weight, module.bias):
            if param is not None and param.requires_grad:
                raise ConfigError(
                    f"fuse_projections (--fuse-projections) needs frozen weights, but {name} "
                    "requires a gradient (a fine-tuning or adapter method trains it); "
                    "turn --fuse-projections off for this method"
                )


def _fusable(siblings: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear for m in siblings):  # subclasses (LoRA, quantised) differ
        return False
    if not all(type(m.weight) is nn.Parameter and type(m.weight.data) is Tensor for m in siblings):
        return False  # tensor subclasses (torchao int8 weights) keep their own matmul
    first = siblings[0].weight
    return all(m.in_features == siblings[0].in_features and m.weight.dtype == first.dtype
               and m.weight.device == first.device for m in siblings)  # fmt: skip


def fuse_projections(model: nn.Module) -> int:
    """Fuse every Q/K/V and gate/up group of frozen nn.Linear siblings in `model` (idempotent);
    returns the number of groups fused now. Raises ConfigError if a sibling's weight trains or
    `model` is an encoder-decoder model."""
    if is_encoder_decoder(model):
        raise ConfigError(
            f"fuse_projections (--fuse-projections) is for decoder-only models; "
            f"{type(model).__name__} is an encoder-decoder model, whose cross-attention gives "
            "q_proj and k_proj/v_proj different inputs: turn --fuse-projections off"
        )
    count = 0
    for parent_name, parent in model.named_modules():
        for group_names in GROUPS:
            siblings = [getattr(parent, name, None) for name in group_names]
            if any(not isinstance(m, nn.Module) for m in siblings):
                continue
            if any(isinstance(m.__dict__.get("forward"), _SliceForward) for m in siblings):
                continue  # fused already
            if not _fusable(siblings):
                continue
            names = [f"{parent_name}.{name}".lstrip(".") for name in group_names]
            check_frozen(siblings, names)
            group = FusedGroup(siblings, names)
            group.fused()  # concatenated once, now
            for index, module in enumerate(siblings):
                module.forward = _SliceForward(group, index)
            count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Give every fused sibling its own forward back and drop the fused copies; returns how many
    modules were restored."""
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _SliceForward):
            del module.forward
            count += 1
    return count


def fused_groups(model: nn.Module) -> list[FusedGroup]:
    """The distinct fused groups of `model` (for tests and reports)."""
    found: dict[int, FusedGroup] = {}
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, _SliceForward):
            found[id(forward.group)] = forward.group
    return list(found.values())
