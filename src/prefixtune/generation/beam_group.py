"""A request-level batch that decodes one step at a time: beam search, greedy or sampling.

`generate()` runs a batch to completion. The scheduler instead advances a `GroupRun` by one
step between two steps of its continuous batch, so a long beam search never stalls the other
requests, and it can drop inputs between steps (cancelled requests) or fail a single input
whose logits are not finite (e.g. its prefix holds NaN) while the others go on.

The numbers are generate()'s: the same prefill (generate.py), the same token choice
(`pick_tokens`, one random generator for the group seeded by `config.seed`) and the same beam
step (beam.py's `Beams` and `advance_beams`), so a group's outputs equal a `generate()` call on the
same inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, GenerateConfig
from prefixtune.core.attention import ATTN_NAME, PrefixKV
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.models import is_encoder_decoder
from prefixtune.generation.beam import Beams, beam_step
from prefixtune.generation.prefill import (
    frozen_prefix,
    prefill_decoder,
    prefill_encoder_decoder,
    start_tokens,
)
from prefixtune.generation.sampling import ban_repeated_ngrams, invalid_rows, pick_tokens

NON_FINITE = (
    "the model produced non-finite logits (NaN or inf) for this request; its prefix may hold "
    "non-finite values"
)


class GroupRun:
    """B inputs with identical options, decoded step by step (call within inference_mode).

    After each `step()`, `results` maps finished input indices to their new tokens and
    `errors` maps failed ones to a message; `done` is True when no input is left.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        runner: PreTrainedModel,
        input_ids: Tensor,
        attention_mask: Tensor,
        prefix: PrefixKV | None,
        config: GenerateConfig,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
    ) -> None:
        if config.do_sample and config.num_beams > 1:
            raise ConfigError("sampling with num_beams > 1 is not supported; set num_beams=1")
        device = model.device
        self.config, self.pad = config, pad_token_id
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        self.results: dict[int, list[int]] = {}
        self.errors: dict[int, str] = {}
        self.steps = 0
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if prefix is not None:
            if model.config._attn_implementation != ATTN_NAME:
                enable_prefixes(model)
            prefix = frozen_prefix(prefix, model.dtype, device)
        if is_encoder_decoder(model):
            self.state, self.logits = prefill_encoder_decoder(
                runner, input_ids, attention_mask, prefix, config.max_new_tokens
            )
            history = start_tokens(model, len(input_ids), device)[:, None]  # (B, 1)
        else:
            self.state, self.logits = prefill_decoder(
                runner, input_ids, attention_mask, prefix, config.max_new_tokens, None
            )
            history = input_ids[:, :0]  # (B, 0): the prompt does not count for n-grams
        self.beams: Beams | None = None
        if config.num_beams > 1:
            self.beams = Beams.start(history, config.num_beams, config.max_new_tokens, self.pad)
        self.ids = torch.arange(len(input_ids), device=device)  # (R,) input of each row
        self.seqs = history  # (R, h + t) greedy/sampling: n-gram history + new tokens
        self.skip = history.shape[1]
        self.generator = None
        if config.do_sample:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> list[int]:
        """Input indices still decoding."""
        ids = self.ids if self.beams is None else self.beams.ids
        return ids.tolist()

    @property
    def size(self) -> int:
        """Number of inputs still decoding (no device sync: safe to read from other threads)."""
        ids = self.ids if self.beams is None else self.beams.ids
        return ids.shape[0]

    @property
    def done(self) -> bool:
        return self.size == 0

    def drop(self, inputs: set[int]) -> None:
        """Stop decoding `inputs` (they get neither a result nor an error)."""
        active = self.active
        keep = [i for i, input_ in enumerate(active) if input_ not in inputs]
        if len(keep) < len(active):
            self._keep_inputs(torch.tensor(keep, dtype=torch.long, device=self.ids.device))

    def step(self) -> None:
        """One token for every running row (one beam step for beam search)."""
        if self.done:
            return
        self._fail_non_finite()
        if not self.done:
            (self._beam_step if self.beams is not None else self._greedy_step)()
        self.steps += 1

    # ------------------------------------------------------------------ internals
    def _rows_per_input(self) -> int:
        return self.logits.shape[0] // self.size

    def _keep_inputs(self, keep: Tensor) -> None:
        """Keep only the active inputs at positions `keep` (A',), their rows and state."""
        if keep.numel() == 0:
            self.ids = self.ids[:0]
            if self.beams is not None:
                self.beams.keep(keep)
            return
        k = self._rows_per_input()
        rows = (keep[:, None] * k + torch.arange(k, device=keep.device)).reshape(-1)
        if self.beams is not None:
            self.beams.keep(keep)
        else:
            self.ids, self.seqs = self.ids[keep], self.seqs[keep]
        self.state.select(rows)
        self.logits = self.logits[rows]

    def _fail_non_finite(self) -> None:
        """Inputs any of whose rows has non-finite logits fail; the others go on."""
        bad_rows = invalid_rows(self.logits)  # (R,)
        if not bool(bad_rows.any()):
            return
        bad = bad_rows.view(self.size, -1).any(1)  # (A,)
        for input_ in torch.tensor(self.active)[bad.cpu()].tolist():
            self.errors[input_] = NON_FINITE
        self._keep_inputs((~bad).nonzero().squeeze(1))

    def _greedy_step(self) -> None:
        """decode_rows' loop body: pick, record finished rows, feed the rest."""
        config, logits = self.config, self.logits
        if config.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits.float(), self.seqs, config.no_repeat_ngram_size)
        tokens = pick_tokens(logits, config, self.generator)  # (R,)
        self.seqs = torch.cat([self.seqs, tokens[:, None]], dim=1)
        ended = torch.isin(tokens, self.eos)
        finished = ended | (self.steps + 1 == config.max_new_tokens)
        if bool(finished.any()):
            done = self.seqs[finished, self.skip :].tolist()
            cut = ended[finished].tolist()
            for i, row, eos_end in zip(self.ids[finished].tolist(), done, cut, strict=True):
                self.results[i] = row[:-1] if eos_end else row
            keep = (~finished).nonzero().squeeze(1)
            tokens = tokens[keep]
            self._keep_inputs(keep)
        if not self.done:
            self.logits = self.state.step(tokens)

    def _beam_step(self) -> None:
        """beam_search's loop body: advance the beams, record finished inputs, feed the rest."""
        logits = beam_step(self.beams, self.state, self.logits, self.steps, self.config,
                           self.eos, self.results)  # fmt: skip
        if logits is not None:
            self.logits = logits
