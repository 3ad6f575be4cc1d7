"""Rows to tables: flattening, means across seeds, markdown, CSV, and the claim tests' table."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from prefixtune.config import ConfigError
from prefixtune.core.atomic_files import atomic_write_text
from prefixtune.experiments.claims import Comparison


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """A result row with its metrics at the top level (what tables and the CSV show)."""
    skip = ("metrics", "tuning", "versions", "generation")
    return {**{k: v for k, v in row.items() if k not in skip}, **row.get("metrics", {})}


def summarise(rows: list[dict[str, Any]], group_by: str, metrics=("BLEU", "ROUGE_L")) -> list[dict]:
    """Mean and standard deviation of each metric per value of `group_by` (across seeds)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[group_by], []).append(row)
    table = []
    for key, members in groups.items():
        entry: dict[str, Any] = {group_by: key, "runs": len(members)}
        for metric in metrics:
            values = [m[metric] for m in members if metric in m]
            if values:
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    """results.csv with every run's row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=sorted({k for row in rows for k in row}))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())


def markdown_table(table: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join(
        "| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |\n" for r in table
    )


def _predictions(out: Path, run: str, sha: str) -> list[str]:
    path = out / "runs" / f"{run}.predictions.json"
    data = json.loads(path.read_text())
    if data["sources_sha"] != sha:
        raise ConfigError(f"{path}: scored on other test items than its experiment's others")
    return data["predictions"]


def claims_table(comparisons: list[Comparison], rows: list[dict[str, Any]], out: Path,
                 items: list, task: str, n_boot: int = 1000) -> str:  # fmt: skip
    """One line per claim: paper, ours (mean ± sd, n), diff, p, 95% CI, verdict (markdown).

    items: the scored test examples (their references; WebNLG's 'seen' meta for categories)."""
    from prefixtune.evaluation.significance import paired_bootstrap, verdict
    from prefixtune.experiments.runs import sources_digest

    sha = sources_digest(items)
    references = [list(e.references or (e.target,)) for e in items]
    by_cell: dict[str, list[str]] = {}
    for row in rows:
        by_cell.setdefault(row["cell"], []).append(row["run"])
    lines = []
    for comp in comparisons:
        if comp.a not in by_cell or comp.b not in by_cell:
            continue
        systems = [[_predictions(out, run, sha) for run in by_cell[c]] for c in (comp.a, comp.b)]
        subset = None
        if comp.category:
            subset = [i for i, e in enumerate(items) if e.meta.get("seen", "seen") == comp.category]
        test = paired_bootstrap(*systems, references, task=task, n_boot=n_boot, items=subset)
        ci = (test["ci_low"], test["ci_high"])
        paper = (
            f"{comp.paper_a:.1f} vs {comp.paper_b:.1f} ({comp.paper_diff:+.1f})"
            if comp.paper_diff is not None
            else ("a > b" if comp.paper_sign > 0 else "a < b")
        )
        lines.append({"claim": comp.claim, "paper": paper,
                      "ours": f"{test['a']:.2f} vs {test['b']:.2f} "
                              f"(n = {test['runs_a']}/{test['runs_b']})",
                      "diff": f"{test['diff']:+.2f}", "p": f"{test['p']:.3f}",
                      "95% CI": f"[{ci[0]:+.2f}, {ci[1]:+.2f}]",
                      "verdict": verdict(ci, comp.paper_diff, comp.paper_sign)})  # fmt: skip
    if not lines:
        return ""
    columns = ["claim", "paper", "ours", "diff", "p", "95% CI", "verdict"]
    return ("\n## The claims, tested\n\n" + markdown_table(lines, columns) +
            f"\nBLEU of each system: the mean over its runs of corpus BLEU; p and the 95% "
            f"interval of the difference from a paired bootstrap over the {len(items)} test "
            f"items ({n_boot} resamples; evaluation/significance.py). Verdict rule: reproduces "
            "if the interval excludes 0 on the paper's side; does not reproduce if it excludes 0 "
            "on the other side, or holds 0 but not the paper's difference; otherwise "
            "inconclusive at this power. Levels differ from the paper's GPT-2: differences are "
            "compared.\n")  # fmt: skip


def _edge_note(record: dict[str, Any]) -> str:
    """Which values were added past an edge, and whether the pick is still at one."""
    note = f" (grid extended by {', '.join(record['extended'])})" if record.get("extended") else ""
    return note + (" (still at the grid's edge)" if record.get("at_edge") else "")


def tuning_table(rows: list[dict[str, Any]]) -> str:
    """Per cell: every LR's dev scores and the value chosen (from the seed runs' records)."""
    lines, seen = [], set()
    for row in rows:
        record = row.get("tuning") or {}
        if not record or row["cell"] in seen:
            continue
        seen.add(row["cell"])
        grid = "; ".join(f"{lr}: {s['dev_loss']:.4f}" if s.get("dev_loss") is not None
                         else f"{lr}: -" for lr, s in record["lr_grid"].items())  # fmt: skip
        bleu = [s.get("dev_bleu") for s in record["lr_grid"].values()]
        if any(b is not None for b in bleu):
            grid += " (dev BLEU " + ", ".join(f"{b:.1f}" for b in bleu if b is not None) + ")"
        lines.append(
            {
                "cell": row["cell"],
                "dev loss per LR": grid,
                "chosen": f"{record['lr']:g}" + _edge_note(record),
                "selected by": record["selected_by"],
            }
        )
    if not lines:
        return ""
    return "\n## Learning rates (chosen on dev)\n\n" + markdown_table(
        lines, ["cell", "dev loss per LR", "chosen", "selected by"]
    )
