"""What `inspect` shows: counts per split, a document-length histogram, decoded samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.data import shards


@dataclass
class DatasetSummary:
    """Counts and document lengths of a dataset, read from its indexes only."""

    manifest: shards.Manifest
    lengths: dict[str, np.ndarray] = field(default_factory=dict)

    def histogram(self, split: str = "train", bins: int = 10) -> list[tuple[int, int, int]]:
        """(low, high, count) buckets of document length in tokens, log-spaced."""
        lens = self.lengths.get(split, np.zeros(0, np.int64))
        if not lens.size:
            return []
        edges = np.unique(np.geomspace(lens.min(), lens.max() + 1, bins + 1).astype(np.int64))
        counts, _ = np.histogram(lens, edges)
        return [(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def summarize(root: str) -> DatasetSummary:
    """Load a dataset's manifest and every shard's sequence lengths (from the `.idx` files)."""
    m = shards.load_manifest(root)
    out = DatasetSummary(m)
    for split in shards.SPLITS:
        parts = [shards.read_index(m.root / f"{s.prefix}.idx")[1] for s in m.shards if s.split == split]
        out.lengths[split] = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return out


def sample_documents(m: shards.Manifest, n: int, seed: int = 0) -> list[tuple[str, int, np.ndarray]]:
    """`n` documents (prefix, index, tokens) picked at random across the train shards."""
    rng = np.random.default_rng(seed)
    train = [s for s in m.shards if s.split == "train" and s.documents] or [s for s in m.shards if s.documents]
    out = []
    for _ in range(min(n, sum(s.documents for s in train))):
        s = train[int(rng.integers(len(train)))]
        i = int(rng.integers(s.documents))
        _, lengths, pointers, _ = shards.read_index(m.root / f"{s.prefix}.idx")
        data = np.memmap(m.root / f"{s.prefix}.bin", dtype=m.numpy_dtype, mode="r")
        start = int(pointers[i]) // data.itemsize
        out.append((s.prefix, i, np.array(data[start : start + int(lengths[i])])))
    return out
