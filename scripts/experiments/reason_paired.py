"""Paired comparisons of the issue-15 systems on the same held-out examples, from the
`--dump-nll` files of `reason_prosqa.sh` / `reason_countdown.sh`: for each pair (A, B) and each
seed, the difference of answer NLL (nats/token, A - B) with a 95% percentile bootstrap
interval over examples (1,000 resamples, seed 0), and the same pooled over seeds (examples
resampled within each seed). Every model scores the same answer tokens of the same
examples, so the difference is paired example by example.

    python scripts/experiments/reason_paired.py runs/r15/seed*
    python scripts/experiments/reason_paired.py --split eval-heldout --pairs h2-nl8:h2-nl1,... runs/r15cd/seed*
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

PROSQA_PAIRS = "h2:soft_embedding,soft_embedding:h1,h1:liu,h2:h1,coconut:nocot,h2:nocot,soft_embedding:nocot"


def system_names(run: Path, split: str) -> dict[str, str]:
    """Dump model name -> system name (the run directory above `export`)."""
    results = json.loads((run / split / "reasoning.json").read_text())["results"]
    out = {}
    for name, entry in results.items():
        path = Path(entry["model"]["path"])
        out[name] = path.parent.name if path.name == "export" else path.name
    return out


def per_example(run: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """system -> (summed NLL per example, answer tokens per example), in file order."""
    names = system_names(run, split)
    sums, counts = defaultdict(list), defaultdict(list)
    with open(run / split / "nll.jsonl") as f:
        for line in f:
            r = json.loads(line)
            system = names[r["model"]]
            sums[system].append(sum(r["nll"]))
            counts[system].append(len(r["nll"]))
    return {s: (np.array(sums[s]), np.array(counts[s])) for s in sums}


def interval(diff: list[np.ndarray], tokens: list[np.ndarray]) -> tuple[float, float, float]:
    """Token-weighted mean difference and its 95% bootstrap interval (seeded), resampling the
    examples within each stratum (seed)."""
    point = sum(d.sum() for d in diff) / sum(t.sum() for t in tokens)
    rng = np.random.default_rng(0)
    boots, total = np.zeros(1000), np.zeros(1000)
    for d, t in zip(diff, tokens, strict=True):
        idx = rng.integers(0, len(d), (1000, len(d)))
        boots += d[idx].sum(1)
        total += t[idx].sum(1)
    lo, hi = np.percentile(boots / total, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="eval-mini")
    ap.add_argument("--pairs", default=PROSQA_PAIRS, help="comma-separated A:B (A minus B)")
    args = ap.parse_args()
    data = {run: per_example(Path(run), args.split) for run in args.runs}
    print(f"{args.split}: answer NLL difference A - B (nats/token), [95% paired bootstrap over examples]\n")
    print("| A - B | " + " | ".join(Path(r).name for r in args.runs) + " | pooled |")
    print("|---|" + "---|" * (len(args.runs) + 1))
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        cells, diffs, toks = [], [], []
        for run in args.runs:
            d = data[run]
            if a not in d or b not in d:
                cells.append("-")
                continue
            if not np.array_equal(d[a][1], d[b][1]):
                raise SystemExit(f"{run}: {a} and {b} scored different answer tokens")
            diff, tok = d[a][0] - d[b][0], d[a][1]
            p, lo, hi = interval([diff], [tok])
            cells.append(f"{p:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            diffs.append(diff)
            toks.append(tok)
        pooled = "-"
        if diffs:
            p, lo, hi = interval(diffs, toks)
            pooled = f"{p:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(f"| {a} - {b} | " + " | ".join(cells) + f" | {pooled} |")


if __name__ == "__main__":
    main()
