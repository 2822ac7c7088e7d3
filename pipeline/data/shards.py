"""The data contract: Megatron `.bin/.idx` token shards plus `manifest.json`.

One module owns writing and reading both, so the data stage and the training launcher
cannot disagree. A dataset directory holds:

    manifest.json                 written last, atomically: the dataset is complete
    train/00000.bin, .idx         one sequence per document, EOS appended
    validation/00000.bin, .idx
    (part-00000-of-00004/...)     shards of partitioned builds, merged by `merge_manifests`

Shards are written by megatron-core's `IndexedDatasetBuilder` under temporary names and
renamed only once complete, so a killed build never leaves a shard that looks whole.
Reading for training goes through megatron-core's `IndexedDataset` (`open_shard`).
megatron-core (and torch) are imported only when a shard is opened or written.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.tokenizer import sha256_file
from pipeline.errors import PipelineError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
              7: np.float32, 8: np.uint16}


def _indexed_dataset():
    """megatron-core's indexed_dataset module, imported on first use (it pulls in torch).

    Its import warns that Transformer Engine / Apex are absent; that is irrelevant here.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def dtype_for_vocab(vocab_size: int) -> type[np.integer]:
    """Token dtype: uint16 while ids fit (the same rule as megatron-core), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ShardInfo:
    """One finished shard as the manifest records it."""

    prefix: str  # relative to the dataset dir, no suffix
    split: str
    documents: int
    tokens: int
    bin_bytes: int
    idx_bytes: int
    bin_sha256: str
    idx_sha256: str


class ShardWriter:
    """Writes one shard through megatron-core's `IndexedDatasetBuilder`, atomically."""

    def __init__(self, root: Path, prefix: str, split: str, dtype: type[np.integer]) -> None:
        self.root, self.prefix, self.split, self.dtype = root, prefix, split, dtype
        self.path = root / prefix
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.path.with_name(self.path.name + ".bin.tmp")
        self._tmp_idx = self.path.with_name(self.path.name + ".idx.tmp")
        self._builder = _indexed_dataset().IndexedDatasetBuilder(str(self._tmp_bin), dtype=dtype)
        self.documents = 0
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        return self.tokens * np.dtype(self.dtype).itemsize

    def add(self, doc: np.ndarray) -> None:
        """Append one document (already ending in EOS) as one sequence."""
        self._builder.add_document(doc, [len(doc)])
        self.documents += 1
        self.tokens += len(doc)

    def close(self) -> ShardInfo:
        """Finish the index, fsync both files, then rename them into place."""
        self._builder.finalize(str(self._tmp_idx))
        for tmp in (self._tmp_bin, self._tmp_idx):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        bin_path, idx_path = self.path.with_suffix(".bin"), self.path.with_suffix(".idx")
        os.replace(self._tmp_bin, bin_path)
        os.replace(self._tmp_idx, idx_path)
        return ShardInfo(
            prefix=self.prefix, split=self.split, documents=self.documents, tokens=self.tokens,
            bin_bytes=bin_path.stat().st_size, idx_bytes=idx_path.stat().st_size,
            bin_sha256=sha256_file(bin_path), idx_sha256=sha256_file(idx_path),
        )


@dataclass
class Manifest:
    """`manifest.json`: what a dataset holds and how it was made."""

    root: Path
    tokenizer: dict[str, Any]
    vocab_size: int
    eos_id: int
    dtype: str
    shards: list[ShardInfo]
    skipped: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    complete: bool = True

    def prefixes(self, split: str) -> list[str]:
        """Absolute path prefixes (no `.bin/.idx`) of the shards of `split`, in order."""
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return [str(self.root / s.prefix) for s in self.shards if s.split == split]

    def totals(self) -> dict[str, dict[str, int]]:
        out = {k: {"shards": 0, "documents": 0, "tokens": 0} for k in (*SPLITS, "all")}
        for s in self.shards:
            for k in (s.split, "all"):
                out[k]["shards"] += 1
                out[k]["documents"] += s.documents
                out[k]["tokens"] += s.tokens
        return out

    @property
    def numpy_dtype(self) -> type[np.integer]:
        return getattr(np, self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "megatron-indexed-dataset",
            "format_version": self.format_version,
            "complete": self.complete,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "dtype": self.dtype,
            "totals": self.totals(),
            "skipped": dict(sorted(self.skipped.items())),
            "shards": [asdict(s) for s in self.shards],
            **self.provenance,
        }

    def save(self) -> None:
        write_json_atomic(self.root / MANIFEST, self.to_json())


_CORE_KEYS = {"format", "format_version", "complete", "tokenizer", "vocab_size", "eos_id", "dtype",
              "totals", "skipped", "shards"}


def load_manifest(root: str | os.PathLike) -> Manifest:
    """Read `<root>/manifest.json`; a clear error when it is missing, partial or foreign."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = (" (a build is unfinished there: run the same build command again to finish it)"
                if any(root.glob("build-state.json*")) else "")
        raise PipelineError(f"{path}: no manifest; is {root} a data-prep output dir?{hint}")
    try:
        raw = json.loads(path.read_text())
        if raw["format_version"] > FORMAT_VERSION:
            raise PipelineError(f"{path}: format version {raw['format_version']} is newer than this "
                                f"code reads ({FORMAT_VERSION}); upgrade the pipeline")
        m = Manifest(
            root=root, tokenizer=raw["tokenizer"], vocab_size=raw["vocab_size"],
            eos_id=raw["eos_id"], dtype=raw["dtype"],
            shards=[ShardInfo(**s) for s in raw["shards"]], skipped=raw.get("skipped", {}),
            provenance={k: v for k, v in raw.items() if k not in _CORE_KEYS},
            format_version=raw["format_version"], complete=raw.get("complete", False),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path}: not a valid data-prep manifest ({e!r})") from e
    _check_listing(m, raw.get("totals"))
    return m


def _check_listing(m: Manifest, totals: Any) -> None:
    """The manifest agrees with itself: shards stay inside the dataset, totals add up."""
    path = m.root / MANIFEST
    for s in m.shards:
        if s.split not in SPLITS:
            raise PipelineError(f"{path}: shard {s.prefix} has unknown split {s.split!r}")
        prefix = Path(s.prefix)  # checked as written: a split directory may be a symlink to other storage
        if prefix.is_absolute() or ".." in prefix.parts:
            raise PipelineError(f"{path}: shard path {s.prefix!r} leaves the dataset directory {m.root}; "
                                "a manifest may only name shards inside its own directory")
    if totals is not None and totals != m.totals():
        raise PipelineError(f"{path}: 'totals' {totals} do not add up from the shards' counts "
                            f"{m.totals()} (the manifest was edited); rebuild the dataset")


def open_shard(prefix: str):
    """megatron-core `IndexedDataset` over one shard prefix (`ds[i]` = document i's tokens).

    `ds[i]` is a view into the memory map, which megatron closes when `ds` is collected:
    keep the dataset alive while using its arrays (or copy them).
    """
    return _indexed_dataset().IndexedDataset(prefix, multimodal=False, mmap=True)


def token_stream(prefix: str, dtype: type[np.integer]) -> np.ndarray:
    """The shard's documents back to back (each ending in EOS), as a read-only memory map.

    A Megatron `.bin` is exactly this concatenation, so packing into fixed-length
    training sequences reads it directly instead of document by document.
    """
    path = Path(prefix + ".bin")
    if not path.is_file():
        raise PipelineError(f"{path}: shard data missing; run `data-prep verify` on its directory")
    return np.memmap(path, dtype=dtype, mode="r")


def read_index(idx_path: Path) -> tuple[type[np.integer], np.ndarray, np.ndarray, np.ndarray]:
    """Parse a `.idx` without megatron: (dtype, lengths, byte pointers, document indices)."""
    data = idx_path.read_bytes()
    if len(data) < 34 or data[:9] != _IDX_HEADER:
        raise PipelineError(f"{idx_path}: not a Megatron index (bad header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", data[9:34])
    if version != 1 or code not in _IDX_CODES:
        raise PipelineError(f"{idx_path}: unsupported index version {version} / dtype code {code}")
    need = 34 + n_seq * (4 + 8) + n_doc * 8
    if len(data) != need:
        raise PipelineError(f"{idx_path}: {len(data)} bytes, but its header implies {need}")
    lengths = np.frombuffer(data, np.int32, n_seq, 34)
    pointers = np.frombuffer(data, np.int64, n_seq, 34 + 4 * n_seq)
    docs = np.frombuffer(data, np.int64, n_doc, 34 + 12 * n_seq)
    return _IDX_CODES[code], lengths, pointers, docs


def check_shard(m: Manifest, s: ShardInfo, checksums: bool = False) -> tuple[Path, Path]:
    """The cheap half of `verify_shard`: both files present, of the recorded sizes, and the index
    consistent with the manifest's counts (reads the `.idx`, not the data). `checksums` also
    re-hashes both files. Returns the (bin, idx) paths."""
    base = m.root / s.prefix
    bin_path, idx_path = base.with_suffix(".bin"), base.with_suffix(".idx")
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise PipelineError(f"{p}: missing (listed in {m.root / MANIFEST}); rebuild the dataset")
    for p, size, digest in ((bin_path, s.bin_bytes, s.bin_sha256), (idx_path, s.idx_bytes, s.idx_sha256)):
        actual = p.stat().st_size
        if actual != size:
            raise PipelineError(f"{p}: {actual} bytes, manifest says {size} (truncated or replaced)")
        if checksums and sha256_file(p) != digest:
            raise PipelineError(f"{p}: sha256 differs from the manifest (corrupted: a changed byte)")
    dtype, lengths, pointers, docs = read_index(idx_path)
    if np.dtype(dtype) != np.dtype(m.dtype):
        raise PipelineError(f"{idx_path}: dtype {np.dtype(dtype).name}, manifest says {m.dtype}")
    if len(lengths) != s.documents or not np.array_equal(docs, np.arange(s.documents + 1)):
        raise PipelineError(f"{idx_path}: {len(lengths)} sequences / {len(docs) - 1} documents, "
                            f"manifest says {s.documents} single-sequence documents")
    if int(lengths.astype(np.int64).sum()) != s.tokens or (lengths < 1).any():
        raise PipelineError(f"{idx_path}: sequence lengths sum to {int(lengths.sum())}, manifest says {s.tokens}")
    if s.tokens * np.dtype(dtype).itemsize != s.bin_bytes:
        raise PipelineError(f"{bin_path}: {s.bin_bytes} bytes cannot hold {s.tokens} tokens of {m.dtype}")
    return bin_path, idx_path


def check_dataset(root: str | os.PathLike, checksums: bool = False) -> Manifest:
    """What training runs before its first step: the manifest is complete and every shard agrees
    with it (`check_shard`; with `checksums` the full `verify_dataset` pass instead)."""
    if checksums:
        return verify_dataset(root)
    m = load_manifest(root)
    if not m.complete:
        raise PipelineError(f"{m.root / MANIFEST}: marked incomplete (\"complete\": false); "
                            "rerun the build to finish it")
    for s in m.shards:
        check_shard(m, s)
    return m


def verify_shard(m: Manifest, s: ShardInfo, chunk_tokens: int = 1 << 24) -> None:
    """Check one shard against the manifest and its index against its data; raise on any gap."""
    bin_path, idx_path = check_shard(m, s, checksums=True)
    dtype, lengths, pointers, docs = read_index(idx_path)
    item = np.dtype(dtype).itemsize
    expect = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * item
    if not np.array_equal(pointers, expect):
        raise PipelineError(f"{idx_path}: byte pointers do not match the sequence lengths")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    ends = (pointers // item + lengths - 1).astype(np.int64)
    if len(ends) and not (tokens[ends] == m.eos_id).all():
        bad = int(np.argmin(tokens[ends] == m.eos_id))
        raise PipelineError(f"{bin_path}: document {bad} does not end with EOS id {m.eos_id}")
    for start in range(0, len(tokens), chunk_tokens):
        block = tokens[start : start + chunk_tokens]
        if block.size and int(block.max()) >= m.vocab_size:
            raise PipelineError(f"{bin_path}: token id {int(block.max())} >= vocab size {m.vocab_size}")
    del tokens


def verify_dataset(root: str | os.PathLike, progress=None) -> Manifest:
    """Re-read every shard of a dataset; raise `PipelineError` naming the first mismatch.

    Besides the shards: the manifest's totals and shard paths (`load_manifest`) and the
    tokenizer's files, when they are still at the recorded path (`check_tokenizer`)."""
    m = load_manifest(root)
    if not m.complete:
        raise PipelineError(f"{m.root / MANIFEST}: marked incomplete; rerun the build to finish it")
    check_tokenizer(m)
    seen: set[str] = set()
    for s in m.shards:
        if s.prefix in seen:
            raise PipelineError(f"{m.root / MANIFEST}: shard {s.prefix} listed twice")
        seen.add(s.prefix)
        verify_shard(m, s)
        if progress is not None:
            progress(s)
    return m


def check_tokenizer(m: Manifest) -> bool:
    """Compare the tokenizer files at the recorded path with their recorded sha256.

    True when checked; False when the tokenizer is not there (a dataset copied to another
    machine is still usable: its identity stays in the manifest). A changed file raises."""
    tok = m.tokenizer
    path = Path(tok.get("path", ""))
    recorded = tok.get("files") or {}
    if not recorded or not path.exists():
        return False
    folder = path if path.is_dir() else path.parent
    for name, digest in recorded.items():
        f = folder / name
        if not f.is_file():
            return False
        if sha256_file(f) != digest:
            raise PipelineError(f"{f}: sha256 differs from the one recorded in {m.root / MANIFEST}; the "
                                "tokenizer changed since the build, so the shards' ids do not match it")
    return True


def merge_manifests(root: str | os.PathLike, parts: list[str | os.PathLike] | None = None,
                    provenance: dict[str, Any] | None = None) -> Manifest:
    """Combine the manifests of partition builds under `root` into `<root>/manifest.json`.

    Shards are not copied: the merged manifest points at them by relative prefix, so every
    part must lie inside `root`. Parts default to all `root/part-*` directories; they must
    agree on tokenizer, vocabulary, EOS and dtype, and form one complete I/N set.
    """
    root = Path(root).resolve()
    dirs = [Path(p).resolve() for p in parts] if parts else sorted(root.glob("part-*-of-*"))
    if not dirs:
        raise PipelineError(f"{root}: no part-*-of-* directories to merge; pass them explicitly")
    manifests = [load_manifest(d) for d in dirs]
    first = manifests[0]
    shards: list[ShardInfo] = []
    skipped: dict[str, int] = {}
    partitions = []
    for d, m in zip(dirs, manifests, strict=True):
        if not d.is_relative_to(root):
            raise PipelineError(f"{d}: not inside {root}; shards are referenced, not copied")
        for key in ("vocab_size", "eos_id", "dtype"):
            if getattr(m, key) != getattr(first, key):
                raise PipelineError(f"{d}: {key} {getattr(m, key)} differs from {dirs[0]}'s")
        if m.tokenizer.get("files") != first.tokenizer.get("files"):
            raise PipelineError(f"{d}: built with a different tokenizer than {dirs[0]}")
        rel = d.relative_to(root)
        shards += [ShardInfo(**{**asdict(s), "prefix": str(rel / s.prefix)}) for s in m.shards]
        for k, v in m.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        partitions.append(m.provenance.get("partition"))
    counts = {p["count"] for p in partitions if p}
    if len(counts) == 1:
        n = counts.pop()
        have = sorted(p["index"] for p in partitions if p)
        if have != list(range(n)):
            missing = sorted(set(range(n)) - set(have))
            raise PipelineError(f"{root}: partitions {missing} of {n} are missing or duplicated; "
                                "finish those builds before merging")
    merged = Manifest(root=root, tokenizer=first.tokenizer, vocab_size=first.vocab_size,
                      eos_id=first.eos_id, dtype=first.dtype, shards=shards, skipped=skipped,
                      provenance={**(provenance or {}), "merged_from": [str(d.relative_to(root)) for d in dirs],
                                  "options": first.provenance.get("options")})
    merged.save()
    return merged
