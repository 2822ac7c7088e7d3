"""Benchmark: raw tokenizer throughput vs. the full `data-prep build`, per backend and tokenizer kind.

    python launchers/benchmark.py data [--kinds gpt2 spm] [--mb 50 300] [--native-mb 20 60]
        [--workers 2] [--corpus pysource|gsm8k]

Corpus (`--corpus`): `pysource` (default) is the Python source files of this interpreter's
library (stdlib and site-packages), one file per document - text that is never repeated, so
no tokenizer cache can skip work; `gsm8k` is GSM8K question + answer pairs repeated to size.
Every measurement runs in a fresh process, so peak memory (ru_maxrss) is that run's alone.

Per tokenizer kind (`gpt2`: the shared GPT-2 tokenizer; `spm`: a sentencepiece BPE model
trained here on the corpus's first 5 MB, 8000 pieces):
- raw: the libraries alone on the large corpus, texts already in memory - the native one
  (Hugging Face `encode_batch_fast` / sentencepiece `encode`, 1 MiB of text per call) and
  gigatoken's `encode_files(JsonlFileSource)` (reads the file itself, the issue's baseline).
  Only the encode calls are timed.
- build: `python -m data_prep build --tokenizer-backend B` end to end at two corpus sizes;
  the steady-state rate is the difference of tokens over the difference of seconds, so
  fixed start-up (imports of torch/megatron, the exactness check) cancels. Peak RSS at both
  sizes shows whether memory grows with the corpus (gigatoken keeps encode caches).
Nothing here is asserted; the figures go into the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from pipeline.paths import REPO_ROOT, shared_data_dir

RAW_NATIVE = r"""
import json, resource, sys, time
path, tok_path, kind, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = [json.loads(line)["text"] for line in open(path, "rb")]
if kind == "gpt2":
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(tok_path)
    encode = lambda b: sum(len(e) for e in tok.encode_batch_fast(b, add_special_tokens=False))
else:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    encode = lambda b: sum(map(len, sp.encode(b, out_type=int, num_threads=workers)))
t0, n, batch, size = time.perf_counter(), 0, [], 0
for t in texts:
    batch.append(t); size += len(t)
    if size >= 1 << 20:
        n += encode(batch); batch, size = [], 0
n += encode(batch)
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RAW_GIGATOKEN = r"""
import json, resource, sys, time
import gigatoken as gt
path, tok_path, kind = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "gpt2":
    tok = gt.Tokenizer(tok_path)
else:  # the build's own conversion (control pieces unmatched); exactness is not checked here
    from pipeline.data.backends import _sentencepiece_json
    from pipeline.data.tokenizer import load_tokenizer
    tok = gt.Tokenizer.from_json(_sentencepiece_json(load_tokenizer(tok_path)))
t0 = time.perf_counter()
out = tok.encode_files(gt.JsonlFileSource([path], field="text"), parallel=True)
seconds = time.perf_counter() - t0
print(json.dumps({"tokens": int(out.layout.offsets.data[-1]), "seconds": seconds,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def pysource_documents():
    """This interpreter's library .py files (sorted, deterministic), each one document."""
    roots = dict.fromkeys([sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]])
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".py"):
                    try:
                        text = Path(dirpath, name).read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        continue
                    if text.strip():
                        yield text


def gsm8k_documents():
    """GSM8K question+answer pairs, repeated forever with a counter (mostly repeated text)."""
    base = []
    for name in ("train.jsonl", "test.jsonl"):
        for line in open(shared_data_dir() / "gsm8k" / name):
            r = json.loads(line)
            base.append(r["question"] + "\n\n" + r["answer"])
    n = 0
    while True:
        for text in base:
            yield f"{text}\n(Problem {n})"
            n += 1


def make_corpus(path: Path, megabytes: float, corpus: str = "pysource") -> int:
    """Write documents as jsonl until `megabytes` of UTF-8 text; return the document count."""
    docs = pysource_documents() if corpus == "pysource" else gsm8k_documents()
    target, size, n = megabytes * 1e6, 0, 0
    with open(path, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
            size += len(text.encode())
            n += 1
            if size >= target:
                return n
    raise SystemExit(f"the {corpus} corpus has only {size / 1e6:.0f} MB; ask for less")


def _run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run `cmd`; (wall seconds, peak RSS MiB of that process, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    out = p.stdout.read().decode()  # type: ignore[union-attr]
    err = p.stderr.read().decode()  # type: ignore[union-attr]
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


def _build(corpus: Path, tok: str, out: Path, backend: str, workers: int, env: dict[str, str]) -> dict:
    wall, rss, _ = _run_child([sys.executable, "-m", "data_prep", "build", "--input", str(corpus), "--tokenizer",
                               tok, "--output", str(out), "--workers", str(workers), "--tokenizer-backend",
                               backend], env)
    manifest = json.loads((out / "manifest.json").read_text())
    tot = manifest["totals"]["all"]  # text tokens: EOS ids are not counted
    return {"tokens": tot["tokens"] - tot["documents"], "wall": wall, "rss": rss,
            "backend": manifest["tokenizer_backend"]["name"]}


def _spm_model(tmp: Path, corpus_docs: str, env: dict[str, str]) -> str:
    sample = tmp / "spm-sample.jsonl"
    make_corpus(sample, 5, corpus_docs)
    prefix = tmp / "spm"
    _run_child([sys.executable, "-m", "data_prep", "tokenizer", "train", "--input", str(sample), "--output",
                str(prefix), "--vocab-size", "8000", "--max-sentences", "300000"], env)
    return f"{prefix}.model"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["gpt2", "spm"], choices=["gpt2", "spm"])
    ap.add_argument("--mb", type=float, nargs=2, default=[50.0, 300.0], metavar=("SMALL", "LARGE"),
                    help="corpus sizes (MB of text) for gigatoken builds and the raw baselines (default: 50 300)")
    ap.add_argument("--native-mb", type=float, nargs=2, default=[20.0, 60.0], metavar=("SMALL", "LARGE"),
                    help="corpus sizes for builds with the slower native libraries (default: 20 60)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--corpus", default="pysource", choices=["pysource", "gsm8k"])
    args = ap.parse_args(argv)
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.workers), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp_name:
        tmp = Path(tmp_name)
        corpora = {}
        for mb in sorted({*args.mb, *args.native_mb}):
            corpora[mb] = tmp / f"corpus-{mb:g}.jsonl"
            docs = make_corpus(corpora[mb], mb, args.corpus)
            print(f"corpus {mb:g} MB: {docs} documents ({args.corpus})", flush=True)
        for kind in args.kinds:
            tok = str(shared_data_dir() / "tokenizers" / "gpt2") if kind == "gpt2" else _spm_model(tmp, args.corpus, env)
            tok_file = str(Path(tok) / "tokenizer.json") if kind == "gpt2" else tok
            native = "hf" if kind == "gpt2" else "sentencepiece"
            raw = {}  # each library on the large corpus its builds use
            for name, code, extra, mb in ((native, RAW_NATIVE, [str(args.workers)], args.native_mb[1]),
                                          ("gigatoken", RAW_GIGATOKEN, [], args.mb[1])):
                _, _, out = _run_child([sys.executable, "-c", code, str(corpora[mb]), tok_file, kind, *extra], env)
                raw[name] = r = json.loads(out)
                print(f"{kind:4s} raw   {name:13s} {mb:5g} MB: {r['tokens'] / r['seconds'] / 1e6:6.2f} Mtok/s "
                      f"peak RSS {r['rss']:6.0f} MiB", flush=True)
            gt_raw = raw["gigatoken"]["tokens"] / raw["gigatoken"]["seconds"]
            for backend, sizes in ((native, args.native_mb), ("gigatoken", args.mb)):
                runs = [_build(corpora[mb], tok, tmp / f"out-{kind}-{backend}-{mb:g}", backend, args.workers, env)
                        for mb in sizes]
                for mb, r in zip(sizes, runs, strict=True):
                    print(f"{kind:4s} build {backend:13s} {mb:5g} MB: {r['tokens'] / r['wall'] / 1e6:6.2f} Mtok/s "
                          f"end to end, {r['wall']:6.1f} s, peak RSS {r['rss']:6.0f} MiB (encoded by {r['backend']})",
                          flush=True)
                small, big = runs
                steady = (big["tokens"] - small["tokens"]) / (big["wall"] - small["wall"])
                rows.append((kind, backend, raw[backend]["tokens"] / raw[backend]["seconds"] if backend in raw else None,
                             steady, steady / gt_raw, big["tokens"] / big["wall"], small["rss"], big["rss"], sizes,
                             big["backend"]))
    print("\n| tokenizer | backend | raw Mtok/s | build steady Mtok/s | steady / gigatoken raw | "
          "build end-to-end Mtok/s | peak RSS small → large (MiB) | encoded by |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, backend, raw_rate, steady, ratio, e2e, rss_s, rss_l, sizes, used in rows:
        print(f"| {kind} | {backend} | {raw_rate / 1e6:.2f} | {steady / 1e6:.2f} | {ratio:.2f}x | {e2e / 1e6:.2f} | "
              f"{rss_s:.0f} → {rss_l:.0f} ({sizes[0]:g} → {sizes[1]:g} MB) | {used} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
