"""`build`: corpus -> tokenizer -> bounded Megatron shards, resumable and deterministic.

Why one process: the Hugging Face tokenizer's `encode_batch` is already multi-threaded in
Rust and releases the GIL, so the fastest layout here is three overlapping stages in one
process - a thread reading and batching documents, the main thread tokenizing, a thread
appending to the shards - with no token lists pickled between processes. Output order is
input order, so the shards do not depend on `workers` (the tokenizer's thread count).

Restart: each shard is renamed into place when complete and then recorded in
`build-state.json` with the stream position it ends at; a rerun re-reads the inputs, skips
the documents of the recorded shards without tokenizing them, and rebuilds the rest.
`manifest.json` is written last. The split is by a seeded hash of each document's text,
so it depends neither on the worker count nor on the partitioning.

A build is keyed by a fingerprint of its inputs' *content* (xxh3 of every input file's
bytes), the tokenizer's files and every option that decides the output bytes: a rerun
resumes only when that matches (an input edited in place between a kill and the rerun is
refused, not mixed in), and a rerun of a finished build reports it complete and exits 0.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import backends, readers, shards
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STATE = "build-state.json"
PARTITION_BLOCK = 256  # documents per range when a partition splits a file by records


@dataclass
class BuildOptions:
    """Everything that decides the bytes of the output (but `workers`, which does not)."""

    inputs: list[str]
    tokenizer: str
    output: str
    text_key: str = "text"
    workers: int = 0  # tokenizer threads; 0 = all cores
    val_fraction: float = 0.01
    seed: int = 1234
    shard_size: int = 256 << 20  # bytes of .bin per shard, at most (one huge document aside)
    on_error: str = "fail"
    txt_unit: str = "file"
    max_chars: int = readers.MAX_CHARS  # longer documents are bad records (memory grows with them)
    eos_token: str | None = None
    partition: tuple[int, int] = (0, 1)  # (index I, count N)
    overwrite: bool = False
    tokenizer_backend: str = "auto"  # see pipeline.data.backends; never changes the output bytes
    batch_bytes: int = 1 << 20  # text per encode_batch call
    command: list[str] = field(default_factory=lambda: list(sys.argv))


def parse_size(text: str) -> int:
    """'512M', '64KiB', '1G', '100000' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise PipelineError(f"bad size {text!r}; use e.g. 256M, 64K, 1G") from None
    if value <= 0:
        raise PipelineError(f"size must be positive, got {text!r}")
    return value


def parse_partition(text: str) -> tuple[int, int]:
    """'3/8' -> (3, 8); I counts from 0 like SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PipelineError(f"--partition {text!r}: expected I/N, e.g. 0/8") from None
    if not (n >= 1 and 0 <= i < n):
        raise PipelineError(f"--partition {text!r}: need 0 <= I < N")
    return i, n


def partition_dir(output: Path, partition: tuple[int, int]) -> Path:
    i, n = partition
    return output if n == 1 else output / f"part-{i:05d}-of-{n:05d}"


def owner_fn(n_sources: int, partition: tuple[int, int]) -> readers.KeepFn | None:
    """Which records this partition owns: whole files when there are enough, else ranges."""
    i, n = partition
    if n == 1:
        return None
    if n_sources >= n:
        return lambda src, rec: src % n == i
    return lambda src, rec: (src + (rec - 1) // PARTITION_BLOCK) % n == i


class Splitter:
    """Seeded, content-keyed train/validation assignment of documents."""

    def __init__(self, val_fraction: float, seed: int) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise PipelineError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        self.threshold = int(val_fraction * 2**64)
        self.key = seed.to_bytes(8, "little", signed=True)

    def __call__(self, text: str) -> str:
        h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=self.key)
        return "validation" if int.from_bytes(h.digest(), "little") < self.threshold else "train"


def _background(it: Iterable[Any], depth: int = 4) -> Iterator[Any]:
    """Run an iterator in a thread, `depth` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True, name="data-prep-reader")
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _Builder:
    """State of one build: open writers per split, completed shards, resume positions."""

    def __init__(self, opts: BuildOptions, out: Path, tok: Tokenizer, fingerprint: str,
                 state: dict[str, Any]) -> None:
        self.opts, self.out, self.tok, self.fingerprint = opts, out, tok, fingerprint
        self.dtype = shards.dtype_for_vocab(tok.vocab_size)
        self.item = np.dtype(self.dtype).itemsize
        self.done: list[dict[str, Any]] = state.get("shards", [])
        self.writers: dict[str, shards.ShardWriter] = {}
        self.last_ordinal: dict[str, int] = {}
        self.resume = {s: 0 for s in shards.SPLITS}
        self.count = {s: 0 for s in shards.SPLITS}
        for d in self.done:
            self.resume[d["split"]] = max(self.resume[d["split"]], d["end_ordinal"])
            self.count[d["split"]] += 1

    def write_batch(self, native: Any, splits: list[str], ordinals: list[int]) -> None:
        """Append a tokenized batch (in order), cutting shards at the size bound."""
        flat, lengths = self.tok.flat_ids(native, self.dtype)
        lengths = lengths + 1  # + EOS
        ends = np.cumsum(lengths)
        starts = ends - lengths
        buf = np.empty(int(ends[-1]) if len(ends) else 0, self.dtype)
        is_eos = np.zeros(len(buf), bool)
        is_eos[ends - 1] = True
        buf[is_eos] = self.tok.eos_id
        buf[~is_eos] = flat
        for k, split in enumerate(splits):
            doc = buf[starts[k] : ends[k]]
            w = self.writers.get(split)
            if w is not None and w.documents and w.nbytes + len(doc) * self.item > self.opts.shard_size:
                self._finish(split)
                w = None
            if w is None:
                prefix = f"{split}/{self.count[split]:05d}"
                w = self.writers[split] = shards.ShardWriter(self.out, prefix, split, self.dtype)
            w.add(doc)
            self.last_ordinal[split] = ordinals[k]

    def _finish(self, split: str) -> None:
        info = self.writers.pop(split).close()
        self.count[split] += 1
        self.done.append({**asdict(info), "end_ordinal": self.last_ordinal[split] + 1})
        shards.write_json_atomic(self.out / STATE, {"fingerprint": self.fingerprint, "shards": self.done})
        log.info("shard %s: %d documents, %d tokens", info.prefix, info.documents, info.tokens)

    def finish_all(self) -> None:
        for split in list(self.writers):
            self._finish(split)


OUTPUT_OPTIONS = ("text_key", "val_fraction", "seed", "shard_size", "on_error", "txt_unit", "max_chars")


def content_hash(path: str) -> str:
    """xxh3-128 of a file's bytes, or of every file under a directory (names and bytes).

    A fast non-cryptographic hash (GB/s) is enough: it guards against edits, not attacks."""
    import xxhash

    h = xxhash.xxh3_128()
    files = [Path(path)] if os.path.isfile(path) else sorted(f for f in Path(path).rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0" if f != Path(path) else b"")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _fingerprint(opts: BuildOptions, sources: list[readers.Source], tok_id: dict[str, Any]) -> str:
    def content(s: readers.Source) -> str | None:
        try:
            return content_hash(s.path) if s.kind != "builtin" else None  # builtin: keyed by Python
        except OSError:
            return None  # unreadable: the reader reports it with the error policy

    key = {
        "inputs": [(s.path, s.kind, content(s)) for s in sources],
        "tokenizer": tok_id["files"], "eos": tok_id["eos_id"], "python": sys.version,
        **{k: getattr(opts, k) for k in (*OUTPUT_OPTIONS, "partition")},
    }
    return hashlib.sha256(repr(key).encode()).hexdigest()


def _finished(out: Path, fingerprint: str) -> shards.Manifest | None:
    """The finished dataset in `out` when it was built by this very command (else an error)."""
    try:
        m = shards.load_manifest(out)
    except PipelineError as e:
        raise PipelineError(f"{out} holds a {shards.MANIFEST} that does not load ({e}); pass --overwrite to "
                            "rebuild it, or choose a new --output") from None
    if m.provenance.get("build_fingerprint") != fingerprint:
        raise PipelineError(f"{out} already holds a finished dataset ({shards.MANIFEST}) built from other "
                            "inputs or options; choose a new --output, or pass --overwrite to rebuild it")
    try:
        shards.check_dataset(out)
    except PipelineError as e:
        raise PipelineError(f"{out}: finished by this command, but damaged since ({e}); pass --overwrite "
                            "to rebuild it") from None
    return m


def _prepare_output(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any]:
    """Check the output dir; return the resumable state (empty for a fresh build)."""
    import json

    if out.exists() and not out.is_dir():
        raise PipelineError(f"--output {out} is a file; give a directory path")
    if overwrite and out.is_dir():
        for name in (shards.MANIFEST, STATE):
            (out / name).unlink(missing_ok=True)
        for split in shards.SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    for name in (STATE, shards.MANIFEST):  # half-written JSON of a killed run
        (out / f"{name}.tmp").unlink(missing_ok=True)
    state: dict[str, Any] = {}
    if (out / STATE).is_file():
        try:
            state = json.loads((out / STATE).read_text())
        except ValueError:
            state = {}
        if state.get("fingerprint") != fingerprint:
            raise PipelineError(f"{out} holds an unfinished build with other inputs or options; "
                                "rerun that exact command to finish it, or pass --overwrite")
        kept, broken = [], set()
        for d in state.get("shards", []):  # per split, keep shards up to the first damaged one
            if d["split"] in broken or not _intact(out, d):
                broken.add(d["split"])
            else:
                kept.append(d)
        state["shards"] = kept
    elif out.is_dir() and any(out.iterdir()):
        raise PipelineError(f"--output {out} exists and is not empty (and not a data-prep build); "
                            "choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*/*.tmp"):
        tmp.unlink()
    if not state:  # from now on the directory says: an unfinished build lives here
        state = {"fingerprint": fingerprint, "shards": []}
        shards.write_json_atomic(out / STATE, state)
    return state


def _intact(out: Path, d: dict[str, Any]) -> bool:
    base = out / d["prefix"]
    ok = all((base.with_suffix(s)).is_file() and (base.with_suffix(s)).stat().st_size == d[f"{s[1:]}_bytes"]
             for s in (".bin", ".idx"))
    if not ok:
        log.warning("shard %s recorded but damaged; rebuilding from there", d["prefix"])
    return ok


def build(opts: BuildOptions, progress: Callable[[int, int], None] | None = None) -> shards.Manifest:
    """Run (or resume) a build; returns the written manifest. `progress(docs, tokens)` per batch.

    When `opts.output` already holds the dataset this command builds, nothing is redone: its
    manifest is returned with `provenance["already_complete"] = True` (not saved)."""
    sources = readers.resolve_inputs(opts.inputs)
    native = load_tokenizer(opts.tokenizer, opts.eos_token)
    native.set_threads(opts.workers)
    tok_id = native.identity()
    out = partition_dir(Path(opts.output), opts.partition)
    fingerprint = _fingerprint(opts, sources, tok_id)
    if not opts.overwrite and (out / shards.MANIFEST).is_file():
        done = _finished(out, fingerprint)
        done.provenance["already_complete"] = True
        return done
    try:
        return _run(opts, out, sources, native, tok_id, fingerprint, progress)
    except OSError as e:  # the reader turns input errors into PipelineError; these are the output's
        where = e.filename or opts.output
        raise PipelineError(f"cannot write the output: {where}: {e.strerror or e}; check that --output "
                            "is writable and its disk has space") from e


def _run(opts: BuildOptions, out: Path, sources: list[readers.Source], native: Tokenizer,
         tok_id: dict[str, Any], fingerprint: str,
         progress: Callable[[int, int], None] | None) -> shards.Manifest:
    tok, choice = backends.choose_backend(native, opts.tokenizer_backend)
    tok.set_threads(opts.workers)
    state = _prepare_output(out, fingerprint, opts.overwrite)
    b = _Builder(opts, out, tok, fingerprint, state)
    reader = readers.Reader(sources, opts.text_key, opts.on_error, opts.txt_unit,
                            owner_fn(len(sources), opts.partition), opts.max_chars)
    splitter = Splitter(opts.val_fraction, opts.seed)
    if b.done:
        log.info("resuming %s: %d shards already complete", out, len(b.done))

    def batches() -> Iterator[tuple[list[str], list[str], list[int]]]:
        texts: list[str] = []
        splits: list[str] = []
        ords: list[int] = []
        size = 0
        for ordinal, (text, _src, _rec) in enumerate(reader):
            split = splitter(text)
            if ordinal < b.resume[split]:
                continue
            texts.append(text)
            splits.append(split)
            ords.append(ordinal)
            size += len(text)
            if size >= opts.batch_bytes:
                yield texts, splits, ords
                texts, splits, ords, size = [], [], [], 0
        if texts:
            yield texts, splits, ords

    docs = tokens = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-prep-writer") as pool:
        pending: Future | None = None
        for texts, splits, ords in _background(batches()):
            if tok is not native and docs == 0:  # trust another backend only once exact on real input
                problem = backends.exactness_problem(native, tok, backends.sample_of(texts), "input document")
                if problem:
                    tok, choice = backends.fall_back(native, opts.tokenizer_backend, problem)
                    b.tok = tok
            encoded = tok.encode_native(texts)
            if pending is not None:
                pending.result()
            pending = pool.submit(b.write_batch, encoded, splits, ords)
            docs += len(texts)
            tokens += tok.n_tokens(encoded) + len(texts)
            if progress is not None:
                progress(docs, tokens)
        if pending is not None:
            pending.result()
    b.finish_all()
    if not b.done and (reader.skips or opts.partition[1] == 1):  # a partition may own no records
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(reader.skips.items())) or "none"
        raise PipelineError(f"no documents to write: every record of the input was skipped ({skipped}) "
                            "or the input holds none; check --input, --text-key and the skip reasons")
    manifest = shards.Manifest(
        root=out, tokenizer=tok_id, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
        dtype=np.dtype(b.dtype).name,
        shards=[shards.ShardInfo(**{k: v for k, v in d.items() if k != "end_ordinal"}) for d in b.done],
        skipped=dict(reader.skips), provenance=_provenance(opts, sources, b.fingerprint),
    )
    manifest.provenance["tokenizer_backend"] = choice.to_json()
    manifest.shards.sort(key=lambda s: (shards.SPLITS.index(s.split), s.prefix))
    manifest.save()
    (out / STATE).unlink(missing_ok=True)
    return manifest


def _provenance(opts: BuildOptions, sources: list[readers.Source], fingerprint: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    i, n = opts.partition
    return {
        "command": opts.command,
        "package_version": ver("latent-pipeline"),
        "library_versions": {k: ver(k) for k in ("megatron-core", "tokenizers", "sentencepiece", "gigatoken",
                                                    "numpy")},
        "inputs": [s.path for s in sources],
        "partition": {"index": i, "count": n} if n > 1 else None,
        "build_fingerprint": fingerprint,
        "options": {k: getattr(opts, k) for k in OUTPUT_OPTIONS}
        | {"partition_block": PARTITION_BLOCK, "eos_appended": True, "split_by": "blake2b(seed, text)"},
    }
