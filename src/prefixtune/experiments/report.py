"""Tables (markdown, CSV) and plots of an experiment's runs, in the paper's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefixtune.core.atomic_files import atomic_write_text
from prefixtune.experiments.tables import flat, markdown_table, summarise, write_results

# What each experiment groups by and plots on its x axis.
GROUPING = {"lowdata": ("size", "method"), "length": ("length", None), "init": ("init", None),
            "table1": ("method", None), "table1-webnlg": ("method", None),
            "table1-dart": ("method", None),
            "xsum": ("method", None), "xsum-sports": ("method", None)}  # fmt: skip


METRICS = {"table1-webnlg": ("BLEU_seen", "BLEU_unseen", "BLEU_all", "TER_all"),
           "table1": ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"),
           "table1-dart": ("BLEU", "METEOR", "TER"),
           "xsum": ("ROUGE_1", "ROUGE_2", "ROUGE_L"),
           "xsum-sports": ("ROUGE_1", "ROUGE_2", "ROUGE_L")}  # fmt: skip


# Experiments reported as the paper's tables: one row per method, its share of trainable
# parameters, then the paper's columns (Table 1: E2E; WebNLG seen/unseen/all; Tables 2-3: ROUGE).
WEBNLG_COLUMNS = tuple(f"{m}_{c}" for m in ("BLEU", "METEOR", "TER")
                       for c in ("seen", "unseen", "all"))  # fmt: skip


TABLE_LAYOUT = {"table1": ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"),
                "table1-dart": ("BLEU", "METEOR", "TER"),
                "table1-webnlg": WEBNLG_COLUMNS,
                "xsum": METRICS["xsum"], "xsum-sports": METRICS["xsum"]}  # fmt: skip


TABLE_NOTE = (
    "Mean and sd over seeds (n = runs); scored test items, best-dev-loss weights. % params: what the saved artifact keeps per "
    "task, as a share of the base model (the paper's column; a prefix is its folded keys/values); "
    "% trained: what the optimizer updated (a prefix's MLP reparameterisation included)."
)


SEEDS_NOTE = "Means and standard deviations across seeds; test subset, best-dev-loss prefix."


def plot(table: list[dict[str, Any]], x: str, series: str | None, metric: str, path: Path) -> None:
    """A line plot (numeric x) or bar chart of `metric` with standard-deviation error bars."""
    fig, ax = _figure((5, 3.5))
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault(row.get(series) if series else metric, []).append(row)
    for label, rows in groups.items():
        rows = sorted(rows, key=lambda r: r[x])
        xs = [r[x] for r in rows]
        ys = [r.get(metric, float("nan")) for r in rows]
        errs = [r.get(f"{metric}_sd", 0.0) for r in rows]
        if all(isinstance(v, int | float) for v in xs):
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=str(label))
        else:
            ax.bar([str(v) for v in xs], ys, yerr=errs, capsize=3, label=str(label))
            ax.tick_params(axis="x", rotation=30)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if series:
        ax.legend()
    _save(fig, path)


def _figure(size: tuple[float, float]):
    """(figure, axes) drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Method tables whose metrics are plotted side by side per method (one bar each).
GROUPED_PLOTS = {"table1-webnlg": ("BLEU_seen", "BLEU_unseen", "BLEU_all"),
                 "xsum": METRICS["xsum"], "xsum-sports": METRICS["xsum"]}  # fmt: skip


def grouped_bars(table: list[dict[str, Any]], x: str, metrics: tuple[str, ...], path: Path) -> None:
    """Bars of several metrics next to each other for every value of `x` (e.g. per method)."""
    fig, ax = _figure((6.5, 3.5))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(table))]
        ax.bar(xs, [r.get(metric, float("nan")) for r in table], width, label=metric)
    ax.set_xticks(range(len(table)), [str(r[x]) for r in table], rotation=30)
    ax.set_xlabel(x)
    ax.legend(fontsize="small")
    _save(fig, path)


def report(name: str, scale: str, rows: list[dict[str, Any]], out: Path, command: str,
           planned: int | None = None, claims: str = "", tuning: str = "") -> str:  # fmt: skip
    """Write results.csv, results.md and the plot; returns the markdown.

    planned: the number of seed runs; fewer rows than that mark the report partial.
    claims, tuning: the markdown of the claim tests and of the LR tuning (claims_table)."""
    provenance = _provenance(rows)
    rows = [flat(r) for r in rows]
    x, series = GROUPING[name]
    metrics = METRICS.get(name, ("BLEU", "ROUGE_L"))
    keys = [x] + ([series] if series else [])
    table = []
    for key_rows in _split(rows, series):
        for entry in summarise(key_rows, x, metrics):
            if series:
                entry[series] = key_rows[0][series]
            table.append(entry)
    write_results(rows, out)
    head = f"# {name} ({scale} scale)\n\nCommand: `{command}`\n\n"
    if planned and len(rows) < planned:
        head += (f"**Partial:** {len(rows)} of {planned} runs finished (`--report-only`); "
                 "the others are not in this table.\n\n")  # fmt: skip
    head += provenance
    if name in TABLE_LAYOUT:
        body, note = method_table(table, rows, TABLE_LAYOUT[name]), TABLE_NOTE
    else:
        columns = keys + ["runs"] + [c for m in metrics for c in (m, f"{m}_sd")]
        body, note = markdown_table(table, columns), SEEDS_NOTE
    text = f"{head}{body}\n{note}\n"
    if name == "table1-dart":
        text += ("\nBERTScore, MoverScore, BLEURT: not computed (they need model weights from the "
                 "Hugging Face hub, which this project runs without).\n")  # fmt: skip
    text += claims + tuning + f"\n![{name}]({name}.png)\n"
    atomic_write_text(out / "results.md", text)
    if name in GROUPED_PLOTS:
        grouped_bars(table, x, GROUPED_PLOTS[name], out / f"{name}.png")
    else:
        plot(table, x, series, metrics[0], out / f"{name}.png")
    return text


def _provenance(rows: list[dict[str, Any]]) -> str:
    """Machines, dtypes, versions and time of the runs in the table."""
    machines = sorted({str(r.get("machine")) for r in rows})
    dtypes = sorted({str(r.get("dtype")) for r in rows})
    versions = sorted({f"torch {v.get('torch')}, transformers {v.get('transformers')}"
                       for r in rows if isinstance(v := r.get("versions"), dict)})  # fmt: skip
    hours = sum(r.get("wall_seconds") or 0.0 for r in rows) / 3600
    return (
        f"Machines: {'; '.join(machines)}. dtype: {', '.join(dtypes)}. "
        f"{'; '.join(versions)}. Wall time of these runs: {hours:.2f} h.\n\n"
    )


def method_table(table: list[dict[str, Any]], rows: list[dict[str, Any]],
                 metrics: tuple[str, ...]) -> str:  # fmt: skip
    """The paper's table layout: method | n | % params | % trained | metric (mean +- sd)."""
    shares = {r["method"]: r for r in rows}
    lines = [{"method": e["method"], "n": e["runs"],
              "% params": _percent(shares[e["method"]].get("stored_share")),
              "% trained": _percent(shares[e["method"]].get("trainable_share")),
              **{m: _mean_sd(e, m) for m in metrics}} for e in table]  # fmt: skip
    return markdown_table(lines, ["method", "n", "% params", "% trained", *metrics])


def _mean_sd(entry: dict[str, Any], metric: str) -> str:
    if metric not in entry:
        return ""
    return f"{entry[metric]:.2f} ± {entry[f'{metric}_sd']:.2f}"


def _percent(share: float | None) -> str:
    if share is None:
        return ""
    return f"{100 * share:.3g}%"


def _split(rows: list[dict[str, Any]], series: str | None) -> list[list[dict[str, Any]]]:
    if not series:
        return [rows]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[series], []).append(row)
    return list(groups.values())
