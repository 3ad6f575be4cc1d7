"""The model's position limit, which a prefix brings closer.

Real tokens of a decoder-only model take positions after the prefix (P prefix positions, then
T tokens, then the new ones), so P + T (+ max_new_tokens when generating) must fit in the
model's positions: past them GPT-2's learned position table raises an IndexError deep inside
the model, and rotary models run on positions they were never trained on. Training, generation,
evaluation and the server check it here, before any model call. Encoder-decoder positions do
not move with the prefix (its keys/values carry none), so they have no limit here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from prefixtune.config import ConfigError
from prefixtune.core.models import is_encoder_decoder


def position_limit(model: Any) -> int | None:
    """Positions a decoder-only model can address (`max_position_embeddings`, GPT-2's
    `n_positions`); None for encoder-decoder models or where the config names none."""
    if is_encoder_decoder(model):
        return None
    text = model.config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_positions(
    limit: int | None,
    *,
    prefix: int,
    tokens: int,
    new_tokens: int = 0,
    what: str = "the input",
    hint: str = "",
) -> None:
    """Raise ConfigError when prefix + tokens + new_tokens positions exceed `limit` (None: no
    limit). `what` names the input (an example, a row, a line); `hint` says what to lower."""
    total = prefix + tokens + new_tokens
    if limit is None or total <= limit:
        return
    new = f" + max_new_tokens {new_tokens}" if new_tokens else ""
    advice = f"; {hint}" if hint else ""
    raise ConfigError(
        f"{what} has {tokens} tokens (T): with a prefix of {prefix} positions (P){new} that is "
        f"{total}, past the model's {limit} positions{advice}"
    )


def check_rows(
    limit: int | None,
    tokens: Tensor,
    prefixes: Tensor | None,
    *,
    new_tokens: int = 0,
    hint: str = "",
) -> None:
    """`check_positions` for each row of a batch: its real tokens (B,) and prefix positions
    (B,) (None: no prefix); names the first row that does not fit."""
    if limit is None:
        return
    counts = tokens.tolist()
    offsets = [0] * len(counts) if prefixes is None else prefixes.tolist()
    for row, (count, prefix) in enumerate(zip(counts, offsets, strict=True)):
        check_positions(limit, prefix=prefix, tokens=count, new_tokens=new_tokens,
                        what=f"row {row}", hint=hint)  # fmt: skip
