"""End to end through `data_prep.cli.main`: exactness, determinism, partitions, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from data_prep.cli import main
from pipeline.data import shards
from pipeline.data.build import Splitter


def build(corpus: Path, tok: Path, out: Path, *extra: str) -> int:
    return main(["build", "--input", str(corpus), "--tokenizer", str(tok), "--output", str(out),
                 "--val-fraction", "0.1", "--shard-size", "16K", *extra])


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".bin", ".idx")}


def read_docs(root: Path, split: str) -> list[list[int]]:
    m = shards.load_manifest(root)
    out = []
    for prefix in m.prefixes(split):
        ds = shards.open_shard(prefix)
        out += [ds[i].tolist() for i in range(len(ds))]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gsm8k):
    path = tmp_path_factory.mktemp("corpus") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in gsm8k[:600]))
    return path, gsm8k[:600]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, gpt2_tokenizer_dir):
    out = tmp_path_factory.mktemp("ref") / "ds"
    assert build(corpus[0], gpt2_tokenizer_dir, out, "--workers", "2") == 0
    return out


def test_shards_hold_exactly_the_tokenizer_ids_plus_eos(reference, corpus, gpt2_tokenizer_dir):
    ref = tokenizers.Tokenizer.from_file(str(gpt2_tokenizer_dir / "tokenizer.json"))
    split = Splitter(0.1, 1234)
    for name in ("train", "validation"):
        expected = [ref.encode(t).ids + [50256] for t in corpus[1] if split(t) == name]
        assert read_docs(reference, name) == expected and expected
    m = shards.load_manifest(reference)
    assert m.dtype == "uint16" and m.eos_id == 50256 and m.vocab_size == 50257
    assert all(s.bin_bytes <= 16 * 1024 for s in m.shards) and len(m.prefixes("train")) > 3
    raw = json.loads((reference / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["command"][0] == "data-prep" and raw["package_version"]
    assert raw["tokenizer"]["files"]["tokenizer.json"] == shards.sha256_file(gpt2_tokenizer_dir / "tokenizer.json")
    assert raw["totals"]["all"]["documents"] == 600 and raw["skipped"] == {}


def test_a_relative_tokenizer_path_is_recorded_absolute(corpus, gpt2_tokenizer_dir, tmp_path, monkeypatch):
    """Evaluation loads the manifest's tokenizer from wherever it runs: a path relative to the
    build's working directory would be "tokenizer not found" anywhere else."""
    import shutil

    from pipeline.data.tokenizer import load_tokenizer

    shutil.copytree(gpt2_tokenizer_dir, tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    assert build(corpus[0], Path("tok"), Path("ds"), "--workers", "1") == 0
    recorded = shards.load_manifest(tmp_path / "ds").tokenizer["path"]
    assert recorded == str(tmp_path / "tok")
    monkeypatch.chdir(tmp_path.parent)
    assert load_tokenizer(recorded).vocab_size == 50257 and shards.check_tokenizer(shards.load_manifest(tmp_path / "ds"))


def test_output_does_not_depend_on_workers(reference, corpus, gpt2_tokenizer_dir, tmp_path):
    assert build(corpus[0], gpt2_tokenizer_dir, tmp_path / "w1", "--workers", "1") == 0
    assert shard_bytes(tmp_path / "w1") == shard_bytes(reference)


def test_partitions_merge_into_the_same_dataset(reference, corpus, gpt2_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "big"
    for i in range(3):  # one file, so partitions take interleaved ranges of its records
        assert build(corpus[0], gpt2_tokenizer_dir, out, "--partition", f"{i}/3") == 0
    assert main(["merge-manifests", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    merged, ref = shards.load_manifest(out), shards.load_manifest(reference)
    for split in ("train", "validation", "all"):  # shard counts differ: each part cuts its own
        got, want = merged.totals()[split], ref.totals()[split]
        assert (got["documents"], got["tokens"]) == (want["documents"], want["tokens"])
    assert merged.prefixes("train")[0].startswith(str(out / "part-00000-of-00003"))
    for split in ("train", "validation"):
        assert sorted(read_docs(out, split)) == sorted(read_docs(reference, split))


def test_merge_needs_every_partition(corpus, gpt2_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "big"
    assert build(corpus[0], gpt2_tokenizer_dir, out, "--partition", "1/2") == 0
    assert main(["merge-manifests", str(out)]) == 2
    assert "partitions [0] of 2 are missing" in capsys.readouterr().err


def test_existing_output_and_bad_input_messages(reference, corpus, gpt2_tokenizer_dir, tmp_path, capsys):
    assert build(corpus[0], gpt2_tokenizer_dir, reference, "--seed", "7") == 2  # a different command
    assert "already holds a finished dataset" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert build(corpus[0], gpt2_tokenizer_dir, tmp_path / "other") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": broken}\n{"text": ""}\n')
    assert build(bad, gpt2_tokenizer_dir, tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}:2" in err and "Traceback" not in err
    assert build(bad, gpt2_tokenizer_dir, tmp_path / "o2", "--on-error", "skip") == 0
    assert shards.load_manifest(tmp_path / "o2").skipped == {"invalid_json": 1, "empty_text": 1}
    assert build(bad, tmp_path / "no-tokenizer", tmp_path / "o3") == 2
    assert "tokenizer not found" in capsys.readouterr().err


def test_overwrite_rebuilds(reference, corpus, gpt2_tokenizer_dir, tmp_path):
    out = tmp_path / "ds"
    assert build(corpus[0], gpt2_tokenizer_dir, out, "--shard-size", "4K") == 0
    assert build(corpus[0], gpt2_tokenizer_dir, out, "--overwrite") == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_inspect_verify_and_help(reference, capsys):
    assert main(["inspect", str(reference), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "document length" in out and "<|endoftext|>" in out
    assert main(["verify", str(reference)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    for cmd in (["build"], ["tokenizer", "train"], ["tokenizer", "show"], ["verify"], ["inspect"],
                ["merge-manifests"], []):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_sentencepiece_train_then_build(tmp_path, corpus, capsys):
    assert main(["tokenizer", "train", "--input", str(corpus[0]), "--output", str(tmp_path / "tok" / "spm"),
                 "--vocab-size", "500", "--special-tokens", "<|latent|>"]) == 0
    assert "vocab 500" in capsys.readouterr().out
    assert main(["tokenizer", "show", str(tmp_path / "tok" / "spm.model"), "--text", "hi"]) == 0
    assert build(corpus[0], tmp_path / "tok" / "spm.model", tmp_path / "ds") == 0
    m = shards.verify_dataset(tmp_path / "ds")
    assert m.eos_id == 2 and m.tokenizer["kind"] == "sentencepiece"
    docs = read_docs(tmp_path / "ds", "train")
    assert all(d[-1] == 2 and 2 not in d[:-1] for d in docs)
    assert np.max([max(d) for d in docs]) < 500
