"""The issue-15 results table from `reason_prosqa.sh` runs: one row per system, per eval set,
mean over seeds of accuracy and answer NLL, with the spread across seeds (stderr of the seed
mean) and the mean within-seed stderr; paper 000 Table 2 / Coconut Table 1 beside it.

    python scripts/experiments/reason_table.py runs/r15/seed*      # prints markdown
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ORDER = ["cot", "nocot", "pause", "soft_embedding", "liu", "h1", "h2", "coconut"]
# ProsQA accuracy (%) at GPT-2 124M: paper 000 Table 2 (N_L = 12); CoT / no-CoT from Coconut (Hao et al.) Table 1
PAPER = {"cot": "77.5", "nocot": "76.7", "pause": "-", "soft_embedding": "97.7", "liu": "52.6", "h1": "54.1",
         "h2": "99.0", "coconut": "97.0"}


def system(entry: dict) -> str:
    path = Path(entry["model"]["path"])
    return path.parent.name if path.name == "export" else path.name


def spread(xs: list[float], digits: int) -> str:
    m = statistics.mean(xs)
    if len(xs) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.{digits}f}"


def main(runs: list[str]) -> None:
    for split, title in (("eval-mini", "held-out ProsQA-mini (512)"), ("eval-test", "official ProsQA test (500)")):
        rows: dict[str, dict[str, list[float]]] = {}
        for run in runs:
            f = Path(run) / split / "reasoning.json"
            if not f.is_file():
                continue
            for entry in json.loads(f.read_text())["results"].values():
                r = rows.setdefault(system(entry), {"acc": [], "acc_se": [], "nll": [], "nll_se": []})
                r["acc"].append(100 * entry["accuracy"])
                r["acc_se"].append(100 * entry["accuracy_stderr"])
                r["nll"].append(entry["answer_nll"])
                r["nll_se"].append(entry["answer_nll_stderr"])
        print(f"\n{title}; seeds: {max((len(r['acc']) for r in rows.values()), default=0)}\n")
        print("| system | exact match % (seed mean ± s.e. over seeds) | within-seed s.e. | answer NLL nats/token "
              "| within-seed s.e. | per-seed EM | paper EM % (GPT-2 124M) |")
        print("|---|---|---|---|---|---|---|")
        for name in ORDER:
            if name not in rows:
                continue
            r = rows[name]
            print(f"| {name} | {spread(r['acc'], 1)} | {statistics.mean(r['acc_se']):.1f} | {spread(r['nll'], 3)} "
                  f"| {statistics.mean(r['nll_se']):.3f} | {', '.join(f'{a:.1f}' for a in r['acc'])} | {PAPER[name]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
