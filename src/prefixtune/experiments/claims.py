"""The paper's claims, one comparison each, tested by the paired bootstrap on our predictions.

A comparison names two cells (a and b), the paper's numbers for them (or only the direction of
their difference) and the items scored (WebNLG: seen/unseen/all). Our difference is the mean
over seeds of corpus BLEU, the test is evaluation.significance.paired_bootstrap and the verdict
its rule (significance.verdict): levels differ from the paper's GPT-2 models, differences are
compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Table 1 (GPT-2 medium), BLEU per method label: E2E, WebNLG S/U/A, DART.
PAPER_TABLE1 = {
    "finetune": {"e2e": 68.2, "seen": 64.2, "unseen": 27.7, "all": 46.5, "dart": 46.2},
    "ft-top2": {"e2e": 68.1, "seen": 53.6, "unseen": 18.9, "all": 36.0, "dart": 41.0},
    "adapter (3.0%)": {"e2e": 68.9, "seen": 60.4, "unseen": 48.3, "all": 54.9, "dart": 45.2},
    "adapter (0.1%)": {"e2e": 66.3, "seen": 54.5, "unseen": 45.1, "all": 50.2, "dart": 42.4},
    "prefix": {"e2e": 69.7, "seen": 62.9, "unseen": 45.6, "all": 55.1, "dart": 46.4},
}


@dataclass
class Comparison:
    claim: str
    a: str
    """Cell name of the first system (our difference is a - b)."""
    b: str
    paper_a: float | None = None
    paper_b: float | None = None
    paper_sign: int = 0
    """When the paper gives only a direction: +1 (a better) or -1."""
    category: str = ""
    """WebNLG: score only 'seen' or 'unseen' items ('' or 'all': every item)."""

    @property
    def paper_diff(self) -> float | None:
        if self.paper_a is None or self.paper_b is None:
            return None
        return self.paper_a - self.paper_b


def comparisons(experiment: str, cells: list[Any]) -> list[Comparison]:
    """The claims an experiment's cells can test (cells missing from the grid are skipped)."""
    names = {c.name: c for c in cells}
    label = {c.name: c.labels.get("method") for c in cells}
    out: list[Comparison] = []
    if experiment.startswith("table1"):
        column = {"table1": ("e2e",), "table1-dart": ("dart",),
                  "table1-webnlg": ("seen", "unseen", "all")}[experiment]  # fmt: skip
        for col in column:
            category = "" if col in ("e2e", "dart", "all") else col
            for name in names:
                paper = PAPER_TABLE1.get(label[name])
                if name == "finetune" or paper is None:
                    continue
                out.append(Comparison(f"Table 1 {col}: {label[name]} vs fine-tune", name,
                                      "finetune", paper[col], PAPER_TABLE1["finetune"][col],
                                      category=category))  # fmt: skip
            for name in ("embedding", "infix"):  # section 7: both below prefix-tuning
                if name in names and "prefix" in names:
                    out.append(Comparison(f"{col}: {name} vs prefix (paper: worse)", name,
                                          "prefix", paper_sign=-1, category=category))  # fmt: skip
    elif experiment == "lowdata":
        for cell in cells:
            if cell.labels["method"] == "prefix":
                size = cell.labels["size"]
                out.append(Comparison(f"Figure 3, {size} examples: prefix vs fine-tune",
                                      cell.name, f"finetune-n{size}", paper_sign=1))  # fmt: skip
    elif experiment == "init":
        for cell in cells:
            if cell.name != "random":
                out.append(Comparison(f"Figure 5: init '{cell.labels['init']}' vs random",
                                      cell.name, "random", paper_sign=1))  # fmt: skip
    elif experiment == "length":
        lengths = sorted(c.labels["length"] for c in cells)
        short, peak = lengths[0], max((n for n in lengths if n <= 10), default=lengths[0])
        if peak != short:
            out.append(Comparison(f"Figure 4: length {peak} vs {short}", f"len{peak}",
                                  f"len{short}", paper_sign=1))  # fmt: skip
        if lengths[-1] > peak:
            out.append(Comparison(f"Figure 4: length {lengths[-1]} vs {peak} (slight drop)",
                                  f"len{lengths[-1]}", f"len{peak}", paper_sign=-1))  # fmt: skip
    return [c for c in out if c.a in names and c.b in names]
