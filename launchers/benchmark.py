"""Benchmarks: print speed and memory figures (never asserted in tests).

    python launchers/benchmark.py data  [--help]   # tokenizer vs. build throughput
    python launchers/benchmark.py model [--help]   # forward+backward tokens/s, ours vs transformers
    python launchers/benchmark.py dual  [--help]   # packed three-pass step vs per-site loop
    python launchers/benchmark.py eval  [--help]   # ppl-at-k sites/s, multiple-choice questions/s
    python launchers/benchmark.py train [--help]   # training tokens/s per variant under DeepSpeed
    python launchers/benchmark.py coconut [--help] # Coconut vs dual Hyp. 2: train step and inference at N_L = 4, 8, 16
    python launchers/benchmark.py ltm   [--help]   # LTM step (inner + slow) vs plain LM of equal size, FLOPs/token

Each suite lives beside the code it measures (`pipeline/<area>/benchmark.py`);
this file only dispatches, importing the suite it runs and nothing else.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SUITES = {
    "data": "pipeline.data.benchmark",
    "model": "pipeline.models.benchmark",
    "dual": "pipeline.dual.benchmark",
    "eval": "pipeline.eval.benchmark",
    "train": "pipeline.train.benchmark",
    "coconut": "pipeline.coconut.benchmark",
    "ltm": "pipeline.ltm.benchmark",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        print(__doc__.strip())
        print(f"\nsuites: {', '.join(SUITES)}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = importlib.import_module(SUITES[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
