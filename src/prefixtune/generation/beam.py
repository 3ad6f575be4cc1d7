"""Batched beam search over B inputs x K beams (B*K rows), scored as `transformers` does.

A hypothesis that ends (EOS, or max_new_tokens reached) after n new tokens, EOS included,
scores sum(log p) / n**length_penalty. Each step keeps the best (1 + #EOS ids) * K
continuations of every input: the best K that do not end keep running, and those among the top
K that end compete for the K finished slots. An input is done when its slots are full
(early_stopping) or no running beam can beat its worst finished one; done inputs leave the
batch. The first step runs on the B prompt rows (their K beams would be identical), so the
prompt is prefilled once per input, not once per beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefixtune.config import GenerateConfig
from prefixtune.generation.prefill import DecodeState
from prefixtune.generation.sampling import ban_repeated_ngrams

NEG_INF = float("-inf")


@dataclass
class Beams:
    """Search state of the A inputs still searching (k running beams each: 1 before step 0)."""

    ids: Tensor  # (A,) original input row
    history: Tensor  # (A, h) tokens before the first new one that count for n-grams
    run_tokens: Tensor  # (A, k, t) new tokens of the running beams
    run_scores: Tensor  # (A, k) summed log-probs
    fin_tokens: Tensor  # (A, K, max_new) finished hypotheses (EOS removed), padded
    fin_lens: Tensor  # (A, K) their lengths
    fin_scores: Tensor  # (A, K) length-normalised scores, sorted; -inf in empty slots
    improvable: Tensor  # (A,) a running beam may still beat the worst finished one

    @classmethod
    def start(cls, history: Tensor, beams: int, max_new: int, pad: int) -> Beams:
        batch, device = history.shape[0], history.device
        return cls(
            ids=torch.arange(batch, device=device),
            history=history,
            run_tokens=torch.zeros(batch, 1, 0, dtype=torch.long, device=device),
            run_scores=torch.zeros(batch, 1, device=device),
            fin_tokens=torch.full((batch, beams, max_new), pad, dtype=torch.long, device=device),
            fin_lens=torch.zeros(batch, beams, dtype=torch.long, device=device),
            fin_scores=torch.full((batch, beams), NEG_INF, device=device),
            improvable=torch.ones(batch, dtype=torch.bool, device=device),
        )

    def flat_history(self) -> Tensor:
        """(A*k, h + t): what n-gram blocking looks at for every running row."""
        batch, beams, _ = self.run_tokens.shape
        history = self.history[:, None, :].expand(batch, beams, -1)
        return torch.cat([history, self.run_tokens], dim=2).view(batch * beams, -1)

    def keep(self, index: Tensor) -> None:
        """Keep only the inputs at `index` (A',)."""
        for name in ("ids", "history", "run_tokens", "run_scores", "fin_tokens", "fin_lens"):
            setattr(self, name, getattr(self, name)[index])
        self.fin_scores, self.improvable = self.fin_scores[index], self.improvable[index]


def _gather_beams(tokens: Tensor, beam: Tensor) -> Tensor:
    """tokens (A, k, t), beam (A, n) -> (A, n, t): the token history of each chosen beam."""
    return tokens.gather(1, beam[:, :, None].expand(-1, -1, tokens.shape[2]))


def advance_beams(
    beams: Beams, logp: Tensor, step: int, config: GenerateConfig, eos: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One beam step from log-probs (A*k, V); updates `beams` in place.

    Returns the parent beam (A, K) in [0, k) and token (A, K) of each next running beam, and
    done (A,): inputs whose search is over."""
    width = config.num_beams
    batch, vocab = beams.ids.shape[0], logp.shape[-1]
    beams_now = logp.shape[0] // batch
    total = (logp.view(batch, beams_now, vocab) + beams.run_scores[:, :, None]).view(batch, -1)
    n_keep = min(max(2, 1 + eos.numel()) * width, total.shape[1])
    top_scores, top_index = total.topk(n_keep, dim=1)  # (A, 2K), sorted
    parent, token = top_index // vocab, top_index % vocab
    last = step + 1 == config.max_new_tokens
    is_eos = torch.isin(token, eos)
    ends = is_eos | last

    # running beams for the next step: the best K continuations that do not end
    run_scores, pick = top_scores.masked_fill(ends, NEG_INF).topk(width, dim=1)  # (A, K)
    run_parent, run_token = parent.gather(1, pick), token.gather(1, pick)
    new_run_tokens = torch.cat(
        [_gather_beams(beams.run_tokens, run_parent), run_token[:, :, None]], dim=2
    )  # (A, K, t+1)

    # finished slots: candidates among the top K that end, while this input may still improve
    full = torch.isfinite(beams.fin_scores).all(1)  # (A,)
    open_ = beams.improvable & ~(full & config.early_stopping)
    allowed = ends[:, :width] & open_[:, None]  # (A, K)
    scores = top_scores[:, :width] / float(step + 1) ** config.length_penalty
    scores = scores.masked_fill(~allowed, NEG_INF)
    cand = torch.cat(
        [_gather_beams(beams.run_tokens, parent[:, :width]), token[:, :width, None]], 2
    )
    cand = torch.nn.functional.pad(cand, (0, beams.fin_tokens.shape[2] - cand.shape[2]))
    cand_lens = step + 1 - is_eos[:, :width].long()  # EOS is not part of the output
    merged = torch.cat([beams.fin_scores, scores], dim=1)  # (A, 2K)
    beams.fin_scores, slot = merged.topk(width, dim=1)
    beams.fin_tokens = torch.cat([beams.fin_tokens, cand], 1).gather(
        1, slot[:, :, None].expand(-1, -1, cand.shape[2])
    )
    beams.fin_lens = torch.cat([beams.fin_lens, cand_lens], dim=1).gather(1, slot)
    beams.run_tokens, beams.run_scores = new_run_tokens, run_scores

    # can the best running beam still beat the worst finished one? (HF's heuristic)
    full = torch.isfinite(beams.fin_scores).all(1)
    best = run_scores[:, 0] / float(step + 1) ** config.length_penalty
    beams.improvable &= ~full | (best > beams.fin_scores[:, -1])
    done = ~beams.improvable | (full & config.early_stopping) | last
    return run_parent, run_token, done


def beam_search(
    state: DecodeState,
    logits: Tensor,
    config: GenerateConfig,
    eos: Tensor,
    history: Tensor,
    pad_token_id: int,
) -> list[list[int]]:
    """Beam search from prefill logits (B, V); returns the best hypothesis per input."""
    beams = Beams.start(history, config.num_beams, config.max_new_tokens, pad_token_id)
    results: list[list[int]] = [[] for _ in range(history.shape[0])]
    for step in range(config.max_new_tokens):
        logits = beam_step(beams, state, logits, step, config, eos, results)
        if logits is None:
            break
    return results


def beam_step(
    beams: Beams,
    state: DecodeState,
    logits: Tensor,
    step: int,
    config: GenerateConfig,
    eos: Tensor,
    results: list[list[int]],
) -> Tensor | None:
    """One step from logits (A*k, V): advance the beams, write each finished input's best
    hypothesis into `results` (by original row), feed the rest to `state`; returns their next
    logits (A*K, V), or None when no input is left."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (A*k, V), once per step
    if config.no_repeat_ngram_size:
        logp = ban_repeated_ngrams(logp, beams.flat_history(), config.no_repeat_ngram_size)
    beams_now = logp.shape[0] // beams.ids.shape[0]
    parent, tokens, done = advance_beams(beams, logp, step, config, eos)
    rows = torch.arange(parent.shape[0], device=parent.device)[:, None] * beams_now + parent
    if bool(done.any()):
        best_lens = beams.fin_lens[done, 0].tolist()
        best = beams.fin_tokens[done, 0].tolist()
        for i, row, n in zip(beams.ids[done].tolist(), best, best_lens, strict=True):
            results[i] = row[:n]
        left = (~done).nonzero().squeeze(1)
        beams.keep(left)
        if left.numel() == 0:
            return None
        rows, tokens = rows[left], tokens[left]
    state.select(rows.reshape(-1))  # (A*K,) follow the beams, drop done inputs
    return state.step(tokens.reshape(-1))
