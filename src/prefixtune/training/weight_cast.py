"""Frozen matmul weights stored in the autocast dtype while a training run computes in it.

Autocast casts every fp32 weight to bf16 at every forward op, because casts are cached only for
weights that require a gradient. A frozen base model's weights never change, so prefix-tuning can
cast them once: the matmuls see bit-identical bf16 operands (autocast would have rounded them the
same way), and each step saves a full read and write of the model's matmul weights (measured:
~9% of a SmolLM2 bf16 step on an AMX CPU, 0.5 s of casts in a 5 s profiled step). Only weights
autocast would cast anyway are touched: the linear layers' (nn.Linear, GPT-2's Conv1D) weights
and biases, never trainable ones, never a weight tied to the input embeddings (the embedding
lookup must keep its fp32 output).

Memory: the fp32 weights stay (they come back afterwards), beside bf16 copies of 2 bytes per
parameter, which plain autocast also holds at the step's peak: each cast weight is saved for the
backward, so by the end of the forward every layer's copy is alive at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


def _frozen_matmul_params(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    embeddings = model.get_input_embeddings()
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if type(module) not in (torch.nn.Linear, Conv1D):  # subclasses may use weights otherwise
            continue
        for param in (module.weight, module.bias):
            if param is None or param.requires_grad or id(param) in tied:
                continue
            if param.dtype == torch.float32:
                found[id(param)] = param
    return list(found.values())


@contextlib.contextmanager
def frozen_weights_in(model: PreTrainedModel, dtype: torch.dtype | None) -> Iterator[int]:
    """Within the block, the frozen linear weights of `model` are stored in `dtype` (bf16 or
    fp16 autocast; None or fp32: nothing changes); afterwards the exact fp32 tensors are back.
    Yields the number of parameters cast. Use it only where every forward runs under autocast
    of that dtype: outside autocast an fp32 input would meet a bf16 weight."""
    if dtype is None or dtype == torch.float32:
        yield 0
        return
    params = _frozen_matmul_params(model)
    originals: list[Tensor] = [p.data for p in params]
    try:
        for param in params:
            param.data = param.data.to(dtype)
        yield sum(p.numel() for p in params)
    finally:
        for param, original in zip(params, originals, strict=True):
            param.data = original
