"""A weight-only int8 (or int4) frozen base model, built on torchao (`pip install
prefixtune[quantize]`): the base's linear layers hold int8 weights with one fp scale per output
row, and their matmuls take the activations in the model's dtype. Prefixes train and serve on it
unchanged: the prefix keys/values never pass through a quantized weight, and the gradient with
respect to the activations flows through torchao's linear. Artifacts stay in --save-dtype and
load on the unquantized model.

What is quantized: every `nn.Linear` of the base model (attention projections, MLPs) except the
output head, whose weight is the input embedding in tied models (SmolLM2, Gemma-3) and whose
logits decide every greedy token. Embeddings stay as they are. GPT-2's `Conv1D` layers are not
`nn.Linear` and are left alone (a model with no `nn.Linear` to quantize is refused).

Quantizing happens after `enable_prefixes` verified the model on its full-precision weights, so
the verdict is the model's, not the quantization error's. int4 needs a kernel torchao has on the
device (on CPU, torchao 0.18 has none without the `mslk` package): probed at run time, refused
with torchao's reason where it is missing. Nothing here is a kernel of our own.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel

from prefixtune.config import QUANTIZE_MODES
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.models import ModelLoadError, freeze

log = logging.getLogger(__name__)

QUANTIZED_ATTR = "_prefixtune_quantized"
EXTRA_HINT = "pip install prefixtune[quantize] (torchao)"
PREFIX_METHODS = ("prefix", "multitask")


class QuantizeError(ModelLoadError):
    """The base model cannot be quantized as asked here; the message says why and what to do."""


def _torchao() -> Any:
    try:
        # torchao logs its optional CUDA extensions it cannot load; they are not used here
        logging.getLogger("torchao").setLevel(logging.ERROR)
        import torchao.quantization as quantization
    except ImportError as err:
        raise QuantizeError(f"--quantize needs torchao: {EXTRA_HINT} ({err})") from err
    return quantization


def _config(mode: str) -> Any:
    quantization = _torchao()
    if mode == "int8":
        return quantization.Int8WeightOnlyConfig()
    return quantization.Int4WeightOnlyConfig(group_size=128)


def check_mode(
    mode: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> None:
    """Refuse `mode` before a model is loaded: an unknown name, torchao missing, or no kernel
    for it on `device` in `dtype` (a 256x256 linear is quantized and run forward and backward)."""
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"--quantize must be one of {list(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return
    config = _config(mode)
    probe = torch.nn.Linear(256, 256, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(2, 256, device=device, dtype=dtype, requires_grad=True)
    try:
        _torchao().quantize_(probe, config)
        probe(x).float().sum().backward()
    except (ImportError, NotImplementedError, RuntimeError, ValueError, AssertionError) as err:
        why = f"{type(err).__name__}: {err}"
        hint = (" torchao's int4 weight-only kernels need the `mslk` package (CUDA) or a "
                "packing format with a kernel for this device; use --quantize int8"
                if mode == "int4" else "")  # fmt: skip
        raise QuantizeError(f"--quantize {mode} is not available on {torch.device(device)} "
                            f"with {dtype}: torchao says {why}.{hint}") from err  # fmt: skip


def _targets(model: PreTrainedModel) -> set[int]:
    """ids of the nn.Linear modules to quantize: all but the output head."""
    head = model.get_output_embeddings()
    return {id(m) for m in model.modules()
            if type(m) is torch.nn.Linear and m is not head}  # fmt: skip


def quantize_model(model: PreTrainedModel, mode: str) -> int:
    """Freeze and quantize the base `model` in place (after verifying prefixtune's attention);
    returns the number of linear layers quantized. 'none' does nothing; a model already
    quantized to `mode` is left as it is. Raises QuantizeError where it cannot be done."""
    done = getattr(model, QUANTIZED_ATTR, "none")
    if mode == done:
        return 0
    if done != "none":
        raise QuantizeError(f"the model is already quantized to {done}; load it again for {mode}")
    param = next(model.parameters())
    check_mode(mode, param.device, param.dtype)
    freeze(model)  # a frozen base: no weight trains, dropout off
    targets = _targets(model)
    if not targets:
        raise QuantizeError(f"{type(model).__name__} has no torch.nn.Linear layer to quantize "
                            "(GPT-2 uses Conv1D); use --quantize none")  # fmt: skip
    enable_prefixes(model)  # verified on the full-precision weights, once per model
    _torchao().quantize_(model, _config(mode), filter_fn=lambda m, _fqn: id(m) in targets)
    setattr(model, QUANTIZED_ATTR, mode)
    log.info("quantized %d linear layers of %s to %s weight-only", len(targets),
             type(model).__name__, mode)  # fmt: skip
    return len(targets)


def quantized_mode(model: PreTrainedModel) -> str:
    """'none', 'int8' or 'int4': what quantize_model did to `model`."""
    return getattr(model, QUANTIZED_ATTR, "none")


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes held by the model's parameters and buffers, counting a quantized weight by its
    int8/int4 data and scales (what a quantized base saves)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        names = getattr(tensor, "tensor_data_names", None)
        parts = [getattr(tensor, n) for n in names] if names else [tensor]
        total += sum(p.numel() * p.element_size() for p in parts if p is not None)
    return total


def quantize_base(model: PreTrainedModel, mode: str, method: str) -> int:
    """quantize_model for a run of training `method`: only prefix-tuning methods (prefix,
    multitask) use a quantized base; the others change or add base weights."""
    if mode == "none":
        return 0
    if method not in PREFIX_METHODS:
        raise QuantizeError(
            f"--quantize {mode} is for prefixes only (--method "
            f"{' or '.join(PREFIX_METHODS)}), not --method {method}"
        )
    return quantize_model(model, mode)
