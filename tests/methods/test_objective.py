"""The LM head in checkpointed chunks: the same loss and gradients as one pass, without keeping
N x V logits for backward."""

from __future__ import annotations

import pytest
import torch

from prefixtune.methods import objective
from prefixtune.methods.objective import hidden_states, lm_vocab_size, target_loss

from conftest import VOCAB, tiny_gemma3, tiny_llama


def _batch(rows: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a source part
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, reduction: str):
    """Loss, the gradient at the hidden states and the (tied) head weight's gradient."""
    model.zero_grad(set_to_none=True)
    hidden = hidden_states(model, batch).detach().requires_grad_()
    loss = target_loss(model, hidden, batch["labels"], reduction=reduction)
    loss.backward()
    return loss.detach(), hidden.grad, model.get_output_embeddings().weight.grad.clone()


def _chunk_every_batch(monkeypatch, rows: int, vocab: int) -> None:
    monkeypatch.setattr(objective, "HEAD_CHUNK_ABOVE_VALUES", 0)
    monkeypatch.setattr(objective, "HEAD_CHUNK_VALUES", rows * vocab)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_head_gives_the_same_loss_and_gradients(reduction, softcap, monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama() if softcap is None else tiny_gemma3()
    model.config.get_text_config().final_logit_softcapping = softcap
    model.get_output_embeddings().weight.requires_grad_(True)  # fine-tuning's case: head trains
    batch = _batch()
    whole = _loss_and_grads(model, batch, reduction)
    _chunk_every_batch(monkeypatch, rows=4, vocab=lm_vocab_size(model))  # 19 targets: 5 chunks
    chunked = _loss_and_grads(model, batch, reduction)
    for ours, reference in zip(chunked, whole, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def test_chunked_head_without_gradients_gives_the_same_loss(monkeypatch):
    model = tiny_llama()
    batch = _batch()
    with torch.no_grad():
        whole = target_loss(model, hidden_states(model, batch), batch["labels"])
        _chunk_every_batch(monkeypatch, rows=2, vocab=lm_vocab_size(model))
        chunked = target_loss(model, hidden_states(model, batch), batch["labels"])
    torch.testing.assert_close(chunked, whole)


def _largest_saved(model, batch) -> int:
    """numel of the largest tensor autograd keeps for backward of the loss."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    hidden = hidden_states(model, batch).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        target_loss(model, hidden, batch["labels"])
    return max(sizes)


def test_chunked_head_keeps_no_full_logits_for_backward(monkeypatch):
    model = tiny_llama()
    batch = _batch()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    vocab = lm_vocab_size(model)
    assert _largest_saved(model, batch) >= targets * vocab  # one pass keeps (N, V) logits
    _chunk_every_batch(monkeypatch, rows=4, vocab=vocab)
    assert _largest_saved(model, batch) < 4 * vocab + 1  # at most one chunk's worth
