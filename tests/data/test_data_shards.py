"""The shard contract: write through megatron-core, read back exactly, verify catches damage."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import shards
from pipeline.errors import PipelineError


@pytest.fixture
def dataset(tmp_path):
    """A two-shard dataset of known documents (vocab 1000, EOS 999)."""
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 999, rng.integers(1, 50)), 999).astype(np.uint16) for _ in range(30)]
    infos = []
    for k, part in enumerate((docs[:20], docs[20:])):
        w = shards.ShardWriter(tmp_path, f"train/{k:05d}", "train", np.uint16)
        for d in part:
            w.add(d)
        infos.append(w.close())
    m = shards.Manifest(root=tmp_path, tokenizer={"kind": "test", "files": {}}, vocab_size=1000,
                        eos_id=999, dtype="uint16", shards=infos)
    m.save()
    return tmp_path, docs


def test_roundtrip_through_megatron_indexed_dataset(dataset):
    root, docs = dataset
    m = shards.verify_dataset(root)
    assert m.totals()["train"] == {"shards": 2, "documents": 30, "tokens": sum(map(len, docs))}
    assert m.totals()["validation"]["documents"] == 0 and m.prefixes("validation") == []
    datasets = [shards.open_shard(p) for p in m.prefixes("train")]  # ds[i] are views: keep ds alive
    got = [ds[i] for ds in datasets for i in range(len(ds))]
    assert all(np.array_equal(a, b) for a, b in zip(got, docs, strict=True))
    assert not list(root.glob("**/*.tmp"))
    assert shards.dtype_for_vocab(50257) is np.uint16 and shards.dtype_for_vocab(151936) is np.int32


def test_verify_catches_truncation(dataset):
    root, _ = dataset
    b = root / "train/00001.bin"
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(PipelineError, match=r"00001\.bin: \d+ bytes, manifest says"):
        shards.verify_dataset(root)


def test_verify_catches_flipped_byte(dataset):
    root, _ = dataset
    b = root / "train/00000.bin"
    data = bytearray(b.read_bytes())
    data[7] ^= 0x01
    b.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"00000\.bin: sha256 differs"):
        shards.verify_dataset(root)


def test_verify_catches_missing_idx_and_bad_manifest(dataset):
    root, _ = dataset
    (root / "train/00001.idx").unlink()
    with pytest.raises(PipelineError, match=r"00001\.idx: missing"):
        shards.verify_dataset(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(PipelineError, match="not a valid data-prep manifest"):
        shards.verify_dataset(root)
    (root / "manifest.json").unlink()
    with pytest.raises(PipelineError, match="no manifest"):
        shards.verify_dataset(root)


def test_verify_checks_index_against_data_even_with_matching_checksums(dataset):
    """A manifest rewritten to match corrupt files still fails: the index must fit the data."""
    root, _ = dataset
    m = shards.load_manifest(root)
    b = root / "train/00000.bin"
    data = np.fromfile(b, np.uint16)
    data[-1] = 5  # the last document no longer ends with EOS
    data.tofile(b)
    m.shards[0].bin_sha256 = shards.sha256_file(b)
    m.save()
    with pytest.raises(PipelineError, match="does not end with EOS"):
        shards.verify_dataset(root)
