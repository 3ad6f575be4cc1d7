"""What a conformance run reports: one `Check` per check, one `Report` per model, and the
tolerances the checks hold to."""

from __future__ import annotations

from dataclasses import dataclass, field

TOLERANCE = 1e-4  # float32 logits, relative to the largest reference logit
GRAD_TOLERANCE = 1e-3  # float32 autograd against the plain model's (float64 FD: FD_TOLERANCE)


@dataclass
class Check:
    """One check's outcome: `error` is the measured relative difference (None for exact token
    comparisons), `note` what was compared or why it failed."""

    name: str
    passed: bool
    error: float | None = None
    tolerance: float | None = None
    note: str = ""


@dataclass
class Report:
    """The suite's verdict on one model. status: 'pass', 'refused' (by prefixtune, with
    `reason`), or 'failing' (a check failed on a model prefixtune accepted: silently wrong)."""

    family: str
    status: str
    kinds: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
