"""Benchmark: raw tokenizer throughput vs. the full `data-prep build`, on the same corpus.

    python launchers/benchmark.py data [--tokenizer DIR] [--mb 24 72] [--workers 2]

Corpus: GSM8K question + answer pairs (../shared/data/gsm8k) repeated to each size, as
jsonl - self-contained, real English. Every measurement runs in a fresh process, so peak
memory (ru_maxrss) is that run's alone.

- raw: texts already in memory, the Hugging Face `encode_batch_fast` (and, for reference,
  `encode_batch`) over all of them, 1 MiB of text per call (faster here than one call
  over everything, which also takes GBs); the fastest is the baseline. Only the calls
  are timed; tokens are counted with `len(encoding)`, no id lists are made.
- build: `python -m data_prep build` end to end (process start, imports, reading, hashing,
  tokenizing, writing shards, checksums, manifest), at two corpus sizes; the steady-state
  rate is the difference of tokens over the difference of seconds, so fixed start-up
  cancels, and start-up is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.paths import REPO_ROOT, shared_data_dir

RAW_CHILD = r"""
import json, resource, sys, time
import tokenizers
path, tok_path, batch_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = [json.loads(line)["text"] for line in open(path, "rb")]
tok = tokenizers.Tokenizer.from_file(tok_path)
out = {}
for name in ("encode_batch_fast", "encode_batch"):
    fn = getattr(tok, name)
    for mode in ("batched",):
        t0, n, batch, size = time.perf_counter(), 0, [], 0
        if mode == "single_call":
            n = sum(len(e) for e in fn(texts, add_special_tokens=False))
        else:
            for t in texts:
                batch.append(t); size += len(t)
                if size >= batch_bytes:
                    n += sum(len(e) for e in fn(batch, add_special_tokens=False)); batch, size = [], 0
            n += sum(len(e) for e in fn(batch, add_special_tokens=False))
        out[f"{name}/{mode}"] = {"tokens": n, "seconds": time.perf_counter() - t0}
        if mode == "batched" and name == "encode_batch_fast":
            out["peak_rss_mb_batched"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def make_corpus(path: Path, megabytes: float) -> int:
    """Write GSM8K question+answer documents, repeated, until `megabytes` of text; return docs."""
    gsm = shared_data_dir() / "gsm8k"
    base = []
    for name in ("train.jsonl", "test.jsonl"):
        for line in open(gsm / name):
            r = json.loads(line)
            base.append(r["question"] + "\n\n" + r["answer"])
    target, size, docs = megabytes * 1e6, 0, 0
    with open(path, "w") as f:
        while size < target:
            for rep_text in base:  # a repeat number keeps repeated documents distinct
                text = f"{rep_text}\n(Problem {docs})"
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
                docs += 1
                if size >= target:
                    break
    return docs


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB of that process alone, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    out = p.stdout.read().decode()  # type: ignore[union-attr]
    err = p.stderr.read().decode()  # type: ignore[union-attr]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(shared_data_dir() / "tokenizers" / "gpt2"))
    ap.add_argument("--mb", type=float, nargs=2, default=[50.0, 150.0], metavar=("SMALL", "LARGE"),
                    help="corpus sizes in MB of text (default: 50 150)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.workers), "PYTHONWARNINGS": "ignore"}
    tok_json = str(Path(args.tokenizer) / "tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        results = {}
        for mb in args.mb:
            corpus = Path(tmp) / f"corpus-{mb:g}.jsonl"
            docs = make_corpus(corpus, mb)
            out_dir = Path(tmp) / f"out-{mb:g}"
            wall, rss, _ = run_measured([sys.executable, "-m", "data_prep", "build", "--input", str(corpus),
                                         "--tokenizer", args.tokenizer, "--output", str(out_dir),
                                         "--workers", str(args.workers)], env)
            manifest = json.loads((out_dir / "manifest.json").read_text())
            tot = manifest["totals"]["all"]  # compare text tokens: EOS ids are not counted
            results[mb] = {"docs": docs, "tokens": tot["tokens"] - tot["documents"], "wall": wall, "rss": rss}
            print(f"build  {mb:5g} MB: {docs:8d} docs {results[mb]['tokens']:10d} text tokens "
                  f"{wall:6.2f} s  peak RSS {rss:6.0f} MiB")
        large = Path(tmp) / f"corpus-{args.mb[1]:g}.jsonl"
        _, raw_rss, out = run_measured([sys.executable, "-c", RAW_CHILD, str(large), tok_json, str(1 << 20)], env)
    raw = json.loads(out)
    for k, v in raw.items():
        if isinstance(v, dict):
            print(f"raw    {k:30s} {v['tokens']:10d} tokens {v['seconds']:6.2f} s  {v['tokens'] / v['seconds']:12,.0f} tok/s")
    best = max((v["tokens"] / v["seconds"], k) for k, v in raw.items() if isinstance(v, dict))
    small, big = results[args.mb[0]], results[args.mb[1]]
    steady = (big["tokens"] - small["tokens"]) / (big["wall"] - small["wall"])
    startup = small["wall"] - small["tokens"] / steady
    raw_peak = raw["peak_rss_mb_batched"]
    print(f"\nraw tokenizer (best: {best[1]}): {best[0]:,.0f} tok/s, peak RSS {raw_peak:.0f} MiB "
          f"(texts of the {args.mb[1]:g} MB corpus in memory)")
    print(f"build steady state: {steady:,.0f} tok/s = {steady / best[0]:.2f}x raw; "
          f"fixed start-up {startup:.1f} s; end-to-end {big['tokens'] / big['wall']:,.0f} tok/s "
          f"({big['tokens'] / big['wall'] / best[0]:.2f}x) on the large corpus")
    print(f"build peak RSS {big['rss']:.0f} MiB = {big['rss'] / raw_peak:.2f}x raw "
          f"(small corpus: {small['rss']:.0f} MiB - flat as the corpus grows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
