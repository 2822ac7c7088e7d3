"""The issue-15 results tables from `reason_prosqa.sh` / `reason_countdown.sh` runs: one row per
system, per eval set, mean over seeds of accuracy and answer NLL, with the spread across seeds
(stderr of the seed mean) and the mean within-seed stderr; the paper's number beside it. A
second table pairs every system with no-CoT seed by seed (same seed = same Base and data
order): the mean difference and its stderr over seeds.

    python scripts/experiments/reason_table.py runs/r15/seed*                  # ProsQA, markdown
    python scripts/experiments/reason_table.py --task countdown runs/r15cd/seed*
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TASKS = {
    "prosqa": {
        "order": ["cot", "nocot", "pause", "soft_embedding", "liu", "h1", "h2", "coconut"],
        "splits": [("eval-mini", "held-out ProsQA-mini (512)"), ("eval-test", "official ProsQA test (500)")],
        # accuracy (%) at GPT-2 124M: paper 000 Table 2 (N_L = 12); CoT / no-CoT from Coconut (Hao et al.) Table 1
        "paper": {"cot": "77.5", "nocot": "76.7", "pause": "-", "soft_embedding": "97.7", "liu": "52.6",
                  "h1": "54.1", "h2": "99.0", "coconut": "97.0"},
    },
    "countdown": {
        "order": ["cot", "nocot", *(f"{v}-nl{n}" for v in ("h2", "soft_embedding") for n in (1, 4, 8))],
        "splits": [("eval-heldout", "held-out Countdown, 3 operands (512)")],
        # paper 000 Fig. 3B gives Countdown accuracy only as a plot: it rises from N_L = 1 to 4 to 8
        "paper": {},
    },
}


def system(entry: dict) -> str:
    path = Path(entry["model"]["path"])
    return path.parent.name if path.name == "export" else path.name


def spread(xs: list[float], digits: int) -> str:
    m = statistics.mean(xs)
    if len(xs) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.{digits}f}"


def main(argv: list[str]) -> None:
    task = "prosqa"
    if argv[:1] == ["--task"]:
        task, argv = argv[1], argv[2:]
    spec = TASKS[task]
    for split, title in spec["splits"]:
        rows: dict[str, dict[str, list[float]]] = {}
        by_seed: dict[str, dict[str, tuple[float, float]]] = {}
        for run in argv:
            f = Path(run) / split / "reasoning.json"
            if not f.is_file():
                continue
            for entry in json.loads(f.read_text())["results"].values():
                r = rows.setdefault(system(entry), {"acc": [], "acc_se": [], "nll": [], "nll_se": []})
                r["acc"].append(100 * entry["accuracy"])
                r["acc_se"].append(100 * entry["accuracy_stderr"])
                r["nll"].append(entry["answer_nll"])
                r["nll_se"].append(entry["answer_nll_stderr"])
                by_seed.setdefault(run, {})[system(entry)] = (100 * entry["accuracy"], entry["answer_nll"])
        print(f"\n{title}; seeds: {max((len(r['acc']) for r in rows.values()), default=0)}\n")
        print("| system | exact match % (seed mean ± s.e. over seeds) | within-seed s.e. | answer NLL nats/token "
              "| within-seed s.e. | per-seed EM | paper EM % (GPT-2 124M) |")
        print("|---|---|---|---|---|---|---|")
        for name in spec["order"]:
            if name not in rows:
                continue
            r = rows[name]
            print(f"| {name} | {spread(r['acc'], 1)} | {statistics.mean(r['acc_se']):.1f} | {spread(r['nll'], 3)} "
                  f"| {statistics.mean(r['nll_se']):.3f} | {', '.join(f'{a:.1f}' for a in r['acc'])} "
                  f"| {spec['paper'].get(name, '-')} |")
        print(f"\n{title}: paired with no-CoT, seed by seed (system minus no-CoT; mean ± s.e. over seeds)\n")
        print("| system | Δ exact match (points) | Δ answer NLL (nats/token) | per-seed Δ NLL |")
        print("|---|---|---|---|")
        for name in spec["order"]:
            pairs = [(s[name], s["nocot"]) for s in by_seed.values() if name in s and "nocot" in s]
            if name == "nocot" or not pairs:
                continue
            d_acc = [a[0] - b[0] for a, b in pairs]
            d_nll = [a[1] - b[1] for a, b in pairs]
            print(f"| {name} | {spread(d_acc, 1)} | {spread(d_nll, 3)} | {', '.join(f'{d:+.3f}' for d in d_nll)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
