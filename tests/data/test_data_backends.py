"""Tokenizer backends (issue 20): whichever library encodes, the shards are the same bytes."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from data_prep.cli import main
from pipeline.data import backends, shards
from pipeline.data import build as build_mod
from pipeline.data.tokenizer import load_tokenizer, train_sentencepiece

pytest.importorskip("gigatoken")


def build(inputs, tok: Path, out: Path, *extra: str) -> int:
    inputs = [inputs] if isinstance(inputs, str | Path) else inputs
    return main(["build", "--input", *map(str, inputs), "--tokenizer", str(tok), "--output", str(out),
                 "--val-fraction", "0.1", "--shard-size", "16K", "--on-error", "skip", *extra])


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".bin", ".idx")}


def backend_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())["tokenizer_backend"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gsm8k, texts_module) -> Path:
    """Real text (GSM8K) with the hard strings and the data fixtures' tricky texts as documents."""
    path = tmp_path_factory.mktemp("backends") / "corpus.jsonl"
    docs = [*gsm8k[:300], *backends.HARD_STRINGS, *texts_module]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


@pytest.fixture(scope="module")
def texts_module() -> list[str]:
    from tests.data.conftest import TEXTS

    return list(TEXTS)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, gsm8k) -> Path:
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    train_sentencepiece(gsm8k[:1000], prefix, vocab_size=600, threads=1)
    return Path(f"{prefix}.model")


def edited_gpt2(src: Path, dst: Path, change) -> Path:
    """A copy of the GPT-2 tokenizer directory with its tokenizer.json changed."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer.json").read_text())
    change(config)
    (dst / "tokenizer.json").write_text(json.dumps(config))
    return dst


def single_word_eos(config: dict) -> None:
    """Hugging Face then matches "<|endoftext|>" only as a whole word; gigatoken 0.10 ignores that."""
    config["added_tokens"][0]["single_word"] = True


@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_shards_are_byte_identical_across_backends_and_workers(kind, corpus, spm_model, gpt2_tokenizer_dir,
                                                                tmp_path):
    tok, native = (gpt2_tokenizer_dir, "hf") if kind == "gpt2" else (spm_model, "sentencepiece")
    ref = tmp_path / "ref"
    assert build(corpus, tok, ref, "--tokenizer-backend", native, "--workers", "1") == 0
    assert backend_of(ref)["name"] == native and shard_bytes(ref)
    for backend, workers in ((native, 2), ("gigatoken", 1), ("gigatoken", 2), ("auto", 2)):
        out = tmp_path / f"{backend}-{workers}"
        assert build(corpus, tok, out, "--tokenizer-backend", backend, "--workers", str(workers)) == 0
        assert shard_bytes(out) == shard_bytes(ref), (backend, workers)
        recorded = backend_of(out)
        assert recorded["requested"] == backend and recorded["version"]
        if kind == "gpt2":  # gigatoken reproduces GPT-2 exactly, and auto picks it
            assert recorded["name"] == ("hf" if backend == "hf" else "gigatoken") and not recorded["fallback_reason"]
        elif backend == "gigatoken":  # not sentencepiece (combining marks normalize differently): falls back
            assert recorded["name"] == "sentencepiece" and "different ids" in recorded["fallback_reason"]
        else:  # auto keeps sentencepiece's own encoder for its models (the faster one here)
            assert recorded["name"] == "sentencepiece" and not recorded["fallback_reason"]


@pytest.mark.parametrize("change,reason", [(single_word_eos, "different ids for the hard string"),
                                           (lambda c: c.update(normalizer={"type": "Lowercase"}), "cannot load")])
def test_a_tokenizer_gigatoken_cannot_reproduce_falls_back(change, reason, corpus, gpt2_tokenizer_dir, tmp_path,
                                                           caplog):
    tok = edited_gpt2(gpt2_tokenizer_dir, tmp_path / "tok", change)
    assert build(corpus, tok, tmp_path / "hf", "--tokenizer-backend", "hf") == 0
    for backend in ("auto", "gigatoken"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.data.backends"):
            assert build(corpus, tok, tmp_path / backend, "--tokenizer-backend", backend) == 0
        assert "using hf instead of gigatoken" in caplog.text and reason in caplog.text
        recorded = backend_of(tmp_path / backend)
        assert recorded["name"] == "hf" and reason in recorded["fallback_reason"]
        assert shard_bytes(tmp_path / backend) == shard_bytes(tmp_path / "hf")


def test_the_first_input_batch_is_checked_too(gpt2_tokenizer_dir, tmp_path, monkeypatch, caplog):
    """A difference only the real input shows (the hard strings switched off here) also falls back."""
    tok = edited_gpt2(gpt2_tokenizer_dir, tmp_path / "tok", single_word_eos)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["plain text", "see x<|endoftext|>y here"]))
    assert build(corpus, tok, tmp_path / "hf", "--tokenizer-backend", "hf") == 0
    monkeypatch.setattr(backends, "hard_strings", lambda tok: [])
    assert backends.choose_backend(load_tokenizer(tok), "gigatoken")[1].name == "gigatoken"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.backends"):
        assert build(corpus, tok, tmp_path / "gt", "--tokenizer-backend", "gigatoken") == 0
    assert "for input document 'see x<|endoftext|>y here'" in backend_of(tmp_path / "gt")["fallback_reason"]
    assert shard_bytes(tmp_path / "gt") == shard_bytes(tmp_path / "hf")


def test_backend_mismatches_are_errors(corpus, spm_model, gpt2_tokenizer_dir, tmp_path, capsys, monkeypatch):
    assert build(corpus, spm_model, tmp_path / "a", "--tokenizer-backend", "hf") == 2
    assert "is a sentencepiece tokenizer; use sentencepiece, gigatoken or auto" in capsys.readouterr().err
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "b", "--tokenizer-backend", "sentencepiece") == 2
    assert "is a huggingface tokenizer; use hf" in capsys.readouterr().err
    real = backends.package_version
    monkeypatch.setattr(backends, "package_version", lambda name: None if name == "gigatoken" else real(name))
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "c", "--tokenizer-backend", "gigatoken") == 2
    assert "gigatoken is not installed" in capsys.readouterr().err
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "d") == 0  # auto: the native library, reason recorded
    assert backend_of(tmp_path / "d") | {"version": None} == {
        "name": "hf", "version": None, "requested": "auto", "fallback_reason": "gigatoken is not installed"}


def test_every_input_kind_and_bad_input_with_gigatoken(gsm8k, gpt2_tokenizer_dir, tmp_path, write_jsonl, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = gsm8k[:60]
    inputs = [write_jsonl(tmp_path / "a.jsonl.gz", docs[:10]), tmp_path / "b.json", tmp_path / "c.parquet",
              tmp_path / "d.txt.zst", tmp_path / "e_disk"]
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in docs[10:20]]))
    pq.write_table(pa.table({"text": docs[20:30]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n\n".join(docs[30:40]).encode()))
    datasets.Dataset.from_dict({"text": docs[40:60]}).save_to_disk(str(tmp_path / "e_disk"))
    extra = ("--txt-unit", "paragraph")
    assert build(inputs, gpt2_tokenizer_dir, tmp_path / "hf", "--tokenizer-backend", "hf", *extra) == 0
    assert build(inputs, gpt2_tokenizer_dir, tmp_path / "gt", "--tokenizer-backend", "gigatoken", *extra) == 0
    assert backend_of(tmp_path / "gt")["name"] == "gigatoken"
    assert shard_bytes(tmp_path / "gt") == shard_bytes(tmp_path / "hf")
    assert shards.load_manifest(tmp_path / "gt").totals()["all"]["documents"] > 40

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": broken}\n{"text": "a \\ud800 b"}\n')
    assert main(["build", "--input", str(bad), "--tokenizer", str(gpt2_tokenizer_dir), "--output",
                 str(tmp_path / "o1"), "--tokenizer-backend", "gigatoken"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert build(bad, gpt2_tokenizer_dir, tmp_path / "o2", "--tokenizer-backend", "gigatoken") == 0
    assert shards.load_manifest(tmp_path / "o2").skipped == {"invalid_json": 1, "invalid_text": 1}


class Crash(Exception):
    pass


def test_kill_and_rerun_with_gigatoken_gives_the_same_bytes(corpus, gpt2_tokenizer_dir, tmp_path, monkeypatch):
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "ref", "--tokenizer-backend", "hf") == 0
    real, calls = os.replace, [0]

    def crash(src, dst):
        calls[0] += 1
        if calls[0] > 4:
            raise Crash()
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        build_mod.build(build_mod.BuildOptions(
            inputs=[str(corpus)], tokenizer=str(gpt2_tokenizer_dir), output=str(tmp_path / "out"), val_fraction=0.1,
            shard_size=16 << 10, on_error="skip", tokenizer_backend="gigatoken", batch_bytes=16 << 10))
    monkeypatch.setattr(os, "replace", real)
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "out", "--tokenizer-backend", "gigatoken") == 0
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")


def test_a_fresh_gigatoken_instance_mid_build_changes_nothing(corpus, gpt2_tokenizer_dir, tmp_path, monkeypatch):
    """The periodic fresh instance that bounds gigatoken's cache (every REFRESH_CHARS) keeps the bytes."""
    import gigatoken

    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "ref", "--tokenizer-backend", "hf") == 0
    monkeypatch.setattr(backends, "REFRESH_CHARS", 20_000)
    loads = []
    real = gigatoken.Tokenizer.from_json.__func__
    monkeypatch.setattr(gigatoken.Tokenizer, "from_json", classmethod(lambda cls, data: loads.append(1) or real(cls, data)))
    m = build_mod.build(build_mod.BuildOptions(
        inputs=[str(corpus)], tokenizer=str(gpt2_tokenizer_dir), output=str(tmp_path / "gt"), val_fraction=0.1,
        shard_size=16 << 10, on_error="skip", tokenizer_backend="gigatoken", batch_bytes=4096))
    assert m.provenance["tokenizer_backend"]["name"] == "gigatoken" and len(loads) > 3
    assert shard_bytes(tmp_path / "gt") == shard_bytes(tmp_path / "ref")
