"""Choosing the next token per row: greedy, temperature/top-p sampling that no row can break
(tiny temperatures, non-finite logits), and the no-repeat-n-gram ban."""

from __future__ import annotations

import torch
from torch import Tensor

from prefixtune.config import GenerateConfig


def ban_repeated_ngrams(scores: Tensor, history: Tensor, size: int) -> Tensor:
    """Set to -inf (in place) every token that would repeat an n-gram of `history` (R, L).

    Vectorised over rows: compare the last size-1 tokens with every earlier (size-1)-gram.
    """
    rows, length = history.shape
    if size < 1 or length < size:
        return scores
    grams = history.unfold(1, size, 1)  # (R, L-n+1, n)
    tail = history[:, length - size + 1 :]  # (R, n-1)
    hit = (grams[:, :, :-1] == tail[:, None, :]).all(-1)  # (R, L-n+1)
    vocab = scores.shape[-1]
    target = torch.where(hit, grams[:, :, -1], vocab)  # misses go to a spare column
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, target, True)
    return scores.masked_fill_(banned[:, :vocab], float("-inf"))


MIN_TEMPERATURE = 1e-4


def pick_tokens(
    logits: Tensor, config: GenerateConfig, generator: torch.Generator | None
) -> Tensor:
    """Greedy argmax, or a sample after temperature and nucleus (top-p) filtering: (R, V) -> (R,).

    Robust per row: a temperature under MIN_TEMPERATURE is greedy, the most likely token always
    survives top-p, and a row whose logits give no valid distribution (NaN, +inf, all -inf)
    falls back to its argmax instead of failing the other rows' draw.
    """
    if not config.do_sample or config.temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    probs = sampling_probs(logits, config)  # (R, V)
    valid = invalid_rows(probs).logical_not()  # (R,)
    tokens = logits.argmax(-1)
    if bool(valid.all()):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if bool(valid.any()):
        tokens[valid] = torch.multinomial(probs[valid], 1, generator=generator).squeeze(1)
    return tokens


def sampling_probs(logits: Tensor, config: GenerateConfig) -> Tensor:
    """softmax(logits / temperature) cut to the top-p nucleus, fp32 (R, V); the most likely
    token is always kept. Logits are shifted by their row maximum first, so no finite row
    overflows whatever the temperature."""
    scores = logits.float()
    scores = (scores - scores.amax(-1, keepdim=True)) / config.temperature
    probs = torch.softmax(scores, dim=-1)  # (R, V)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        cut = before >= config.top_p
        cut[:, 0] = False  # a top_p below fp32 resolution still keeps the top token
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs


def invalid_rows(scores: Tensor) -> Tensor:
    """(R,) bool: rows of logits or probabilities (R, V) holding NaN or +inf, or no finite
    value at all (every token -inf): rows no token can be chosen from."""
    return scores.isnan().any(-1) | scores.isposinf().any(-1) | ~(scores > float("-inf")).any(-1)
