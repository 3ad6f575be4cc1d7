"""The training objective: log-likelihood of the target tokens only.

The LM head runs only at positions whose next token is a target, so a batch never materialises
B x T x V logits for its source part (the source is usually most of the tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from prefixtune.core.attention import PrefixKV, position_ids_for
from prefixtune.core.models import is_encoder_decoder, lm_logits
from prefixtune.data.encoding import IGNORE_INDEX


def hidden_states(
    model: PreTrainedModel,
    batch: dict[str, Tensor],
    prefix_kv: PrefixKV | None = None,
    position_ids: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Last hidden states (B, T, d) of the backbone (decoder side for encoder-decoders).

    Decoder-only position ids default to real-token positions offset by each row's prefix.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if is_encoder_decoder(model):
        labels = batch["labels"]
        start = model.config.decoder_start_token_id
        pad = model.config.pad_token_id
        decoder_ids = labels.new_full(labels.shape, pad)
        decoder_ids[:, 0] = start
        decoder_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad)
        inputs["decoder_input_ids"] = decoder_ids  # (B, T_dec): labels shifted right
        inputs["decoder_attention_mask"] = batch.get(
            "decoder_attention_mask", (labels != IGNORE_INDEX).long()
        )
    elif position_ids is not None:
        inputs["position_ids"] = position_ids
    else:
        offset = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=model.device)
        if prefix_kv is not None:
            offset = prefix_kv.row_lengths(len(offset), model.device)
        inputs["position_ids"] = position_ids_for(batch["attention_mask"], offset)
    if prefix_kv is not None:
        inputs["prefix_kv"] = prefix_kv
    out = model.base_model(**inputs, use_cache=False, **kwargs)
    return out.last_hidden_state


def target_positions(model: PreTrainedModel, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(mask over hidden positions (B, T) that predict a target, the targets (N,))."""
    if is_encoder_decoder(model):
        mask = labels != IGNORE_INDEX
        return mask, labels[mask]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # hidden t predicts token t + 1
    return mask, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


def target_loss(
    model: PreTrainedModel, hidden: Tensor, labels: Tensor, *, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy over target tokens; the LM head runs on those positions only, and in
    chunks (`chunked_head_loss`) when the targets' logits would be large."""
    mask, targets = target_positions(model, labels)
    picked = hidden[mask]  # (N, d) for the N target tokens only
    fused_ce = reduction in ("mean", "sum") and not torch.compiler.is_compiling()
    if fused_ce and len(targets) * lm_vocab_size(model) > HEAD_CHUNK_ABOVE_VALUES:
        return chunked_head_loss(model, picked, targets, mean=reduction == "mean")
    logits = lm_logits(model, picked)  # (N, V)
    if fused_ce:
        return TargetCrossEntropy.apply(logits.float(), targets, reduction == "mean")
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


HEAD_CHUNK_VALUES = 2**24  # logits per LM-head chunk: 64 MiB of fp32
HEAD_CHUNK_ABOVE_VALUES = 2**26  # chunk once a batch's target logits pass 256 MiB of fp32


def lm_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding: the width of the logits."""
    return model.get_output_embeddings().weight.shape[0]


def chunked_head_loss(
    model: PreTrainedModel, hidden: Tensor, targets: Tensor, *, mean: bool
) -> Tensor:
    """LM head + cross-entropy over row chunks of (N, d) `hidden`, each chunk checkpointed: the
    forward keeps only each chunk's loss and backward recomputes one chunk's (rows, V) logits at a
    time, so at most HEAD_CHUNK_VALUES logits live at once instead of N x V. This costs one more
    LM-head matmul over the targets; long inputs labelled everywhere (N in the thousands, V ~50k)
    otherwise spend more memory on logits than on the whole checkpointed backbone."""
    rows = max(1, HEAD_CHUNK_VALUES // lm_vocab_size(model))
    chunks = zip(hidden.split(rows), targets.split(rows), strict=True)
    if torch.is_grad_enabled():
        losses = [checkpoint(_head_loss_sum, model, h, t, use_reentrant=False) for h, t in chunks]
    else:
        losses = [_head_loss_sum(model, h, t) for h, t in chunks]
    total = torch.stack(losses).sum()
    return total / max(len(targets), 1) if mean else total


def _head_loss_sum(model: PreTrainedModel, hidden: Tensor, targets: Tensor) -> Tensor:
    return TargetCrossEntropy.apply(lm_logits(model, hidden).float(), targets, False)


CE_CHUNK_VALUES = 2**18  # logits per chunk (1 MiB of fp32): each chunk's passes stay in cache


class TargetCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (N, V) fp32 logits that nothing else uses: the loss is
    logsumexp - logit[target]; backward turns the saved logits into the softmax in place and
    subtracts 1 at the targets. Both run over chunks of rows small enough to stay in cache.
    F.cross_entropy instead writes a log-softmax, a zero-filled one-hot gradient and a third
    (N, V) tensor, each a pass through memory: with a 49k-50k vocabulary that was ~8% of a bf16
    SmolLM2 step on an AMX CPU; this runs 1.46x faster (`prefixtune bench --suite kernels`) and
    gives the same values to rounding."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mean: bool) -> Tensor:
        rows = max(1, CE_CHUNK_VALUES // max(logits.shape[-1], 1))
        lse = torch.cat([torch.logsumexp(c, dim=-1) for c in logits.split(rows)])  # (N,)
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, lse, targets)
        ctx.rows = rows
        ctx.scale = 1.0 / max(len(targets), 1) if mean else 1.0
        losses = lse - picked
        return losses.mean() if mean else losses.sum()

    @staticmethod
    @once_differentiable  # the gradient overwrites the logits: no double backward
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, targets = ctx.saved_tensors
        scale = grad * ctx.scale
        for chunk, chunk_lse in zip(logits.split(ctx.rows), lse.split(ctx.rows), strict=True):
            chunk.sub_(chunk_lse[:, None]).exp_().mul_(scale)  # in place: softmax * scale
        minus = (-scale).expand(len(targets), 1).to(logits.dtype)
        return logits.scatter_add_(1, targets[:, None], minus), None, None


def count_tokens(batch: dict[str, Tensor]) -> tuple[int, int]:
    """(all real tokens trained on, target tokens) in a batch."""
    real = int(batch["attention_mask"].sum())
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    if "decoder_attention_mask" in batch:
        real += targets
    return real, targets
