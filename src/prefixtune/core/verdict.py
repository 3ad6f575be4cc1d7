"""What a verification concludes: the verdict, the refusal error, and the tolerances it is judged
by (relative to the largest reference logit, per parameter dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel

UNVERIFIED_ENV = "PREFIXTUNE_UNVERIFIED"
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


DEFAULT_TOLERANCE = 1e-4  # float32 / float64


PROBE_TOKENS = 8  # len(w) + len(x), fewer where a sliding window or attention chunk is shorter


IGNORED = 1e-5  # a prefix that moves the logits by less than this (relative) is ignored


class UnsupportedModelError(ValueError):
    """prefixtune cannot attach prefixes to this model faithfully; the message says why."""

    def __init__(self, model_type: str, check: str, detail: str, reason: str) -> None:
        self.model_type, self.check, self.detail, self.reason = model_type, check, detail, reason
        super().__init__(
            f"model type {model_type!r} is not supported by prefixtune: check {check} failed: "
            f"{detail}. Likely reason: {reason}. Set {UNVERIFIED_ENV}=1 to use it anyway "
            "(prefixes may then be ignored or the base model changed)."
        )


@dataclass(frozen=True)
class Verdict:
    """The probe's result for one model (cached on it as `_prefixtune_verdict`).

    unchanged: (a) relative logit difference without a prefix; faithful: (c) relative difference
    per checked kind; sites: (b) attention sites seen calling prefixtune's function;
    verified: False only when PREFIXTUNE_UNVERIFIED=1 let a refused model through (`problem`).
    """

    model_type: str
    tolerance: float
    seconds: float
    unchanged: float = float("nan")
    sites: int = 0
    faithful: dict[str, float] = field(default_factory=dict)
    verified: bool = True
    problem: str | None = None


def model_type_of(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "model_type", None) or type(model).__name__)


def tolerance_for(model: PreTrainedModel) -> float:
    """The allowed relative logit difference for the model's parameter dtype."""
    return TOLERANCE.get(next(model.parameters()).dtype, DEFAULT_TOLERANCE)


def relative_error(got: Tensor, reference: Tensor) -> float:
    """max |got - reference| / max |reference| (in float32)."""
    got, reference = got.float(), reference.float()
    scale = reference.abs().max().clamp_min(1e-6)
    return float((got - reference).abs().max() / scale)
