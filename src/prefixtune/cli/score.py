"""Score prediction files of any system with the metrics `evaluate` uses (the official E2E
protocol, WebNLG seen/unseen/all, ROUGE for XSum; see evaluation/metrics.py).

PREDICTIONS: one per line, or .jsonl lines with a "prediction". REFERENCES: one per line with
the references of one input separated by a blank line (the E2E scripts' format), or .jsonl
lines with a "references" list. `evaluate`'s predictions.jsonl is both:

    prefixtune score --task e2e runs/e2e/eval-test/predictions.txt runs/e2e/eval-test/references.txt
    prefixtune score --task webnlg preds.txt refs.txt --categories categories.txt --out scores.json
"""

from __future__ import annotations

import argparse

from prefixtune.cli.args import UserError
from prefixtune.config import METRIC_TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PREDICTIONS",
                        help="one prediction per line, or .jsonl with a 'prediction' field")  # fmt: skip
    parser.add_argument("references", metavar="REFERENCES",
                        help="references, one per line, an input's separated by a blank line; "
                             "or .jsonl with a 'references' list")  # fmt: skip
    parser.add_argument("--task", required=True, choices=METRIC_TASKS,
                        help="metric suite: e2e (official E2E scripts), webnlg (BLEU/METEOR/TER, "
                             "seen/unseen/all with categories), dart, xsum (ROUGE), generic "
                             "(BLEU, ROUGE-L)")  # fmt: skip
    parser.add_argument("--categories", metavar="FILE",
                        help="webnlg: seen or unseen per line, one per prediction (default: a "
                             "references .jsonl's 'category' fields, if it has them)")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the BLEU 95%% confidence interval, as "
                             "evaluate (0: off) (default: 1000)")  # fmt: skip
    parser.add_argument("--out", metavar="FILE", help="also write the scores as JSON here")


def run(args: argparse.Namespace) -> int:
    from prefixtune.core.atomic_files import atomic_write_json
    from prefixtune.evaluation.predictor import format_table
    from prefixtune.evaluation.score_files import score_files

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    report = score_files(args.task, args.predictions, args.references, args.categories,
                         bootstrap=args.bootstrap)  # fmt: skip
    report.update(predictions=args.predictions, references=args.references)
    print(format_table(report["metrics"]))
    print(f"{report['items']} items, task {args.task}")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0
