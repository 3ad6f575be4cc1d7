"""The family matrix: the conformance suite on a tiny random model of every text causal-LM and
seq2seq model type of the installed transformers, one row per family."""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import transformers

from prefixtune.conformance.results import GRAD_TOLERANCE, TOLERANCE, Report
from prefixtune.conformance.seq2seq_checks import FD_TOLERANCE
from prefixtune.conformance.suite import run_suite
from prefixtune.conformance.tiny import build_tiny, families, multimodal_reason, tiny_config

STATUSES = ("pass", "refused", "skipped", "no tiny config", "failing")
RECURRENT = "nothing: these layers hold no keys/values to prefix (recurrent, state-space or linear)"
# words of a refusal's reason -> what prefixtune would need to serve the family
NEEDS = (
    ("ALiBi", "ALiBi slopes for the prefix columns in core/attention.py (and the family on the "
     "attention interface)"),
    ("attention sinks", "the per-head sink logits passed to prefixtune's attention function "
     "(one extra softmax column, as transformers' eager sink attention)"),
    ("bypasses transformers' attention interface", "the family ported to transformers' "
     "attention interface (upstream); prefixtune attaches wherever that interface is called"),
    ("cannot tell this family's attention kinds apart", "site tagging for its module names "
     "(T5-style `EncDecAttention`, layers numbered alike) and, for T5, relative position bias "
     "entries for prefix keys"),
    ("relative position bias", "the position-bias mask kept additive with prefix columns in "
     "core/attention.py (zero bias for cross prefixes, T5's bucketed bias for self prefixes)"),
    ("numbers positions its own way", "position ids offset from the family's own first "
     "position (RoBERTa: padding_idx + 1)"),
    ("different head sizes", "prefixes whose keys and values have separate head sizes "
     "(multi-head latent attention)"),
    ("found no attention module", "prefixes on the attention layers of a hybrid model, verified "
     "against a cache that also holds recurrent state"),
    ("no attention layers with keys/values", f"{RECURRENT}; for attention families whose "
     "modules carry no layer_idx (GPT-Neo, XLM, OpenAI GPT...), the family on transformers' "
     "attention interface"),
    ("a layer without keys/values", RECURRENT),
    ("positions cannot be offset", "a look at how the family positions keys (the prefix is not "
     "equivalent to [w; x]: differential or custom attention)"),
    ("an option of this family", "that option passed through prefixtune's attention function"),
    ("forward does not take the inputs", "the family accepting explicit position ids and a "
     "cache"),
    ("layout prefixtune's prefixes cannot hold", "a prefix layout for its attention state"),
)  # fmt: skip


def needs(reason: str) -> str:
    """What prefixtune would need to serve a family refused for `reason` ('' if unknown)."""
    return next((need for words, need in NEEDS if words in reason), "")


@dataclass
class Row:
    """One family's line of the matrix."""

    family: str
    kind: str  # "causal" or "seq2seq"
    status: str  # one of STATUSES
    kinds: str = ""
    reason: str = ""
    seconds: float = 0.0


def check_family(family: str, kind: str | None = None) -> tuple[Row, Report | None]:
    """Build the family's tiny model and run the suite on it (quietly)."""
    kind = kind or families().get(family, "causal")
    start = time.perf_counter()
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _check(family, kind, start)
    finally:
        quiet.setLevel(level)


def _check(family: str, kind: str, start: float) -> tuple[Row, Report | None]:
    try:
        config = tiny_config(family)
        skip = multimodal_reason(config)
        if skip:
            return Row(family, kind, "skipped", reason=skip), None
        model = build_tiny(family, kind, config)
    except Exception as err:  # noqa: BLE001 - any failure to build is this family's row
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
        return Row(family, kind, "no tiny config", reason=reason[:300],
                   seconds=time.perf_counter() - start), None  # fmt: skip
    report = run_suite(model, family)
    kinds = ", ".join(f"{k} x{n}" for k, n in report.kinds.items()) or "none"
    return Row(family, kind, report.status, kinds, report.reason,
               time.perf_counter() - start), report  # fmt: skip


def run_matrix(names: Iterable[str] | None = None,
               progress: Callable[[Row], None] | None = None) -> list[Row]:  # fmt: skip
    """The matrix over `names` (default: every family), calling `progress` after each row."""
    table = families()
    rows = []
    for name in names or table:
        row, _ = check_family(name, table.get(name))
        rows.append(row)
        if progress:
            progress(row)
    return rows


def counts(rows: list[Row]) -> dict[str, int]:
    found = Counter(row.status for row in rows)
    return {status: found.get(status, 0) for status in STATUSES}


def markdown(rows: list[Row], command: str) -> str:
    """docs/MODELS.md: the table with the transformers version, counts and the command."""
    total = counts(rows)
    lines = [
        "# Model families",
        "",
        f"Generated by `{command}` on transformers {transformers.__version__}: the conformance "
        "suite (`prefixtune.conformance`, checks (1)-(5) in its docstring) on a tiny random "
        "model of every text causal-LM and seq2seq model type transformers lists "
        "(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, `MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`), "
        "its config class's defaults shrunk to 2 layers, hidden 64, 4 heads, vocabulary 128.",
        "",
        f"**{len(rows)} families: {total['pass']} pass, {total['refused']} refused with the "
        f"reason, {total['skipped']} skipped (multimodal wrappers), {total['no tiny config']} "
        f"without a tiny config, {total['failing']} failing (silently wrong).** "
        f"{sum(row.seconds for row in rows):.0f} s of checks on one core.",
        "",
        f"Tolerances: (1) own K/V and (2) mixed batch: logits within {TOLERANCE:.0e} of the "
        "largest reference logit (float32); (3) greedy and 3-beam generation: the same tokens as "
        f"transformers' `generate`; (4) training: gradient within {GRAD_TOLERANCE:.0e} (relative) "
        "of autograd on the plain model with the prefix in its own KV cache (decoder-only), or "
        f"within {FD_TOLERANCE:.0e} of central finite differences in float64 "
        "(encoder-decoder), and every base weight bit-identical after a step; (5) artifact: "
        "bit-identical logits after save and load. Encoder-decoder families: (1) and (3) on the "
        "cross kind (the one with a clean reference), (2), (4), (5) on encoder, decoder and "
        "cross prefixes together. Statuses: *refused* is prefixtune's guard "
        "(`core/verify.py`) refusing the model at `build_encoder` with the reason shown; "
        "*skipped* a multimodal wrapper; *no tiny config* a family whose defaults could not be "
        "shrunk generically into a model that runs its own forward (the error shown).",
        "",
        "| family | kind | attention kinds found | status | reason | would need |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        reason = row.reason.replace("|", "\\|").replace("\n", " ")
        need = needs(row.reason) if row.status == "refused" else ""
        lines.append(
            f"| {row.family} | {row.kind} | {row.kinds} | {row.status} | {reason} | {need} |"
        )
    return "\n".join(lines) + "\n"
