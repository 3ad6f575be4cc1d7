"""The official E2E NLG Challenge evaluation (tuetschek/e2e-metrics), reproduced in Python.

``measure_scores.py`` scores in two parts, and so does this module.

mteval part (BLEU, NIST). The script writes every reference of an item to an SGML file (items
with fewer references get empty padding references) and runs ``mteval-v13a-sig.pl``:
case-insensitive (only ASCII ``A-Z`` is lowercased), mteval "13a" tokenisation, one document.

* BLEU: sacrebleu's corpus BLEU is mteval-v13a BLEU (13a tokeniser, closest reference length
  with ties to the shorter, the mteval ``exp`` smoothing); we only feed it the text as mteval
  sees it (``mteval_normalize``) and drop empty references, as mteval ignores the padding.
* NIST: written by hand (no maintained package implements mteval's NIST): information weights
  ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))`` counted over all references of the
  corpus (unigrams against the total number of reference words); information of the clipped
  matches over the number of hypothesis n-grams, summed for n = 1..5; times the mteval length
  penalty ``exp(-beta * log(ratio)^2)`` (ratio 1.5 gives 0.5) where ratio is hypothesis length
  over average reference length (total reference words / mean number of references per item).

COCO part (METEOR, ROUGE_L, CIDEr). pycocoevalcap's scorers on text tokenised by the Stanford
PTB tokeniser (lowercased, punctuation tokens dropped). The tokeniser jar and METEOR 1.5 need
Java; without it, ``coco_scores`` leaves METEOR out (RuntimeWarning) and uses a pure-Python
approximation of the tokeniser, which matched Stanford's output on all but 14 of the 9,365
E2E dev+test references (and gave the official ROUGE_L/CIDEr on the dev check set).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

__all__ = [
    "JavaNotFoundError",
    "coco_scores",
    "java_available",
    "meteor_score",
    "meteor_session",
    "mteval_bleu_metric",
    "mteval_nist",
    "mteval_normalize",
    "mteval_tokenize",
    "optional_meteor",
    "ptb_tokenize",
]

log = logging.getLogger(__name__)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_TOKENIZE_13A = Tokenizer13a()
# mteval-v13a: a length ratio of 1.5 is penalised to 0.5.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2

Ngram = tuple[str, ...]


class JavaNotFoundError(RuntimeError):
    """Raised when a Java-based metric (METEOR, PTB tokeniser) is asked for without Java."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) turned into one space."""
    return " ".join(text.split())


def mteval_normalize(text: str) -> str:
    """Collapse whitespace and lowercase ASCII letters only, as mteval-v13a (no ``-c``) does."""
    return one_line(text).translate(_ASCII_LOWER)


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` exactly as mteval-v13a scores them (normalised, 13a-tokenised)."""
    return _TOKENIZE_13A(mteval_normalize(text)).split()


def mteval_bleu_metric() -> BLEU:
    """sacrebleu BLEU configured as mteval-v13a; feed it ``mteval_normalize``-d text."""
    return BLEU(lowercase=False, tokenize="13a", smooth_method="exp", force=True)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[Ngram]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: Sequence[Sequence[str]], n: int) -> Counter[Ngram]:
    """Per n-gram, the largest count in any single reference (the clipping counts)."""
    merged: Counter[Ngram] = Counter()
    for ref in refs:
        merged |= _ngrams(ref, n)
    return merged


def _information_weights(refs: Sequence[Sequence[Sequence[str]]], max_n: int) -> dict[Ngram, float]:
    """NIST information of every reference n-gram, counted over the whole reference corpus."""
    counts: Counter[Ngram] = Counter()
    total_words = 0
    for item_refs in refs:
        for ref in item_refs:
            total_words += len(ref)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(ref, n))
    info = {}
    for ngram, count in counts.items():
        prefix = ngram[:-1]
        # mteval-v13a tests the (n-1)-gram *string* for Perl truthiness, so a bigram whose first
        # token is "0" is weighted against the total word count, like a unigram. Reproduced.
        denominator = total_words if prefix in ((), ("0",)) else counts[prefix]
        info[ngram] = -math.log2(count / denominator)
    return info


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def mteval_nist(
    predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5
) -> float:
    """Corpus NIST (mteval-v13a, multi-reference, case-insensitive) on raw strings.

    References that are empty after tokenisation are ignored, like mteval's padding references.
    """
    hyps = [mteval_tokenize(p) for p in predictions]
    refs = [[tok for r in item_refs if (tok := mteval_tokenize(r))] for item_refs in references]
    info = _information_weights(refs, max_n)
    matched_info = [0.0] * max_n
    hyp_ngrams = [0] * max_n
    for hyp, item_refs in zip(hyps, refs, strict=True):
        for n in range(1, max_n + 1):
            clip = _max_ref_counts(item_refs, n)
            matched_info[n - 1] += sum(
                info[g] * min(c, clip[g]) for g, c in _ngrams(hyp, n).items() if g in clip
            )
            hyp_ngrams[n - 1] += max(len(hyp) - n + 1, 0)
    ref_words = sum(len(r) for item_refs in refs for r in item_refs)
    n_refs = sum(len(item_refs) for item_refs in refs)
    if ref_words == 0:
        return 0.0
    avg_ref_len = ref_words / (n_refs / len(refs))
    score = sum(i / max(c, 1) for i, c in zip(matched_info, hyp_ngrams, strict=True))
    return score * _nist_length_penalty(hyp_ngrams[0] / avg_ref_len)


# --------------------------------------------------------------------------- COCO part (Java)


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed for METEOR and the PTB tokeniser)."""
    return shutil.which("java") is not None


def _require_java(what: str) -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            f"Java is required for {what}, but no `java` executable was found on PATH "
            "(install a Java runtime, e.g. OpenJDK 17)"
        )
    return java


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford PTB tokenisation as in the COCO/E2E evaluation: lowercased, punctuation dropped.

    Runs the Stanford CoreNLP 3.4.1 jar shipped with pycocoevalcap once over all texts (stdin,
    one line each). Raises JavaNotFoundError without Java.
    """
    java = _require_java("the Stanford PTB tokenizer")
    if not texts:
        return []
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    main = "edu.stanford.nlp.process.PTBTokenizer"
    cmd = [java, "-cp", jar, main, "-preserveLines", "-lowerCase"]
    data = "".join(one_line(t) + "\n" for t in texts).encode("utf-8")
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if proc.returncode != 0 or len(lines) != len(texts):
        err = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"PTB tokenizer failed ({len(lines)}/{len(texts)} lines): {err}")
    drop = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.split(" ") if w and w not in drop) for line in lines]


_CONTRACTION = re.compile(r"(?<=[^\W_])(n't|'(?:s|re|ll|d|ve|m))\b")
_APPROX_TOKEN = re.compile(
    r"'(?:s|re|ll|d|ve|m)\b|n't\b|\d+(?:[.,/]\d+)+|(?<![^\W_])-\d+|[^\W_]+(?:[-.&/'][^\W_]+)*|\S"
)
_APPROX_DROP = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")"]
)


def _approx_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for ``ptb_tokenize``, used only when Java is missing."""
    text = _CONTRACTION.sub(r" \1", text.lower().replace("£", " # "))
    return " ".join(t for t in _APPROX_TOKEN.findall(text) if t not in _APPROX_DROP)


@contextmanager
def meteor_session() -> Iterator[Any]:
    """A running pycocoevalcap METEOR 1.5 process, always killed and reaped on exit."""
    _require_java("METEOR")
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        proc = scorer.meteor_p
        with suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait()  # reaped: no zombie JVM
        proc.stdout.close()
        proc.stderr.close()
        scorer.lock = threading.Lock()  # a failed compute_score leaves it held; __del__ needs it


def meteor_score(
    scorer: Any, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> float:
    """Corpus METEOR (0-1) from a running session; texts are put on one line, '|||' removed."""

    def clean(text: str) -> str:
        return one_line(text.replace("|||", " "))

    gts = {i: [clean(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [clean(p)] for i, p in enumerate(predictions)}
    try:
        return float(scorer.compute_score(gts, res)[0])
    except (ValueError, OSError) as exc:  # the JVM died: empty output line or broken pipe
        scorer.meteor_p.kill()
        err = scorer.meteor_p.stderr.read().decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"the METEOR java process failed ({exc!r}): {err}") from exc


@contextmanager
def optional_meteor(extra: str = "") -> Iterator[Any | None]:
    """A METEOR session, or None with a RuntimeWarning when Java is missing."""
    if not java_available():
        msg = "Java is required for METEOR (no `java` on PATH): METEOR is left out of the scores"
        log.warning(msg + extra)
        warnings.warn(msg + extra, RuntimeWarning, stacklevel=3)
        yield None
        return
    with meteor_session() as scorer:
        yield scorer


def coco_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """METEOR (x100), ROUGE_L (x100), CIDEr on PTB tokens: the E2E script's COCO part.

    Inputs are assumed valid (checked by ``prefixtune.evaluation.metrics``).
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    texts = list(predictions) + [r for refs in references for r in refs]
    java = java_available()
    tokens = ptb_tokenize(texts) if java else [_approx_ptb_tokenize(t) for t in texts]
    hyps, flat = tokens[: len(predictions)], iter(tokens[len(predictions) :])
    refs = [[next(flat) for _ in item_refs] for item_refs in references]
    out: dict[str, float] = {}
    note = "; ROUGE_L and CIDEr use an approximate pure-Python PTB tokenizer" if not java else ""
    with optional_meteor(note) as scorer:
        if scorer is not None:
            out["METEOR"] = 100 * meteor_score(scorer, hyps, refs)
    gts, res = dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}
    out["ROUGE_L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
