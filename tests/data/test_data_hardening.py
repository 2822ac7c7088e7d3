"""Bad input and damaged data (issue 19): each gives a clear `error:` (exit 2, naming the file,
line or key) or a counted skip - never a traceback, a silent loss or a silent duplication."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from data_prep.cli import main
from pipeline.data import build as build_mod
from pipeline.data import shards


def build(inputs, tok: Path, out: Path, *extra: str) -> int:
    inputs = [inputs] if isinstance(inputs, str | Path) else inputs
    return main(["build", "--input", *map(str, inputs), "--tokenizer", str(tok), "--output", str(out),
                 "--val-fraction", "0.1", *extra])


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def documents(out: Path) -> int:
    return shards.load_manifest(out).totals()["all"]["documents"]


def skipped(out: Path) -> dict[str, int]:
    return shards.load_manifest(out).skipped


@pytest.fixture(scope="module")
def docs(gsm8k) -> list[str]:
    return gsm8k[:200]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs, gpt2_tokenizer_dir) -> Path:
    """A finished dataset, built with a private copy of the tokenizer (tests change its file)."""
    tmp = tmp_path_factory.mktemp("hardening")
    tok = tmp / "tok"
    shutil.copytree(gpt2_tokenizer_dir, tok)
    (tmp / "c.jsonl").write_bytes(jsonl(docs))
    assert build(tmp / "c.jsonl", tok, tmp / "ds", "--shard-size", "16K") == 0
    return tmp / "ds"


def copy_of(dataset: Path, tmp_path: Path) -> Path:
    shutil.copytree(dataset, tmp_path / "copy")
    return tmp_path / "copy"


def edit_manifest(root: Path, change) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    change(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


# --- verify ------------------------------------------------------------------------------
def test_verify_checks_the_totals(dataset, tmp_path, capsys):
    root = copy_of(dataset, tmp_path)
    edit_manifest(root, lambda m: m["totals"]["train"].update(documents=m["totals"]["train"]["documents"] + 5))
    assert main(["verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'totals'" in err and "manifest.json" in err


def test_verify_checks_the_tokenizer_sha256(dataset, tmp_path, capsys):
    assert main(["verify", str(dataset)]) == 0
    assert "tokenizer files match" in capsys.readouterr().out
    root = copy_of(dataset, tmp_path)
    tok = tmp_path / "tok"
    shutil.copytree(shards.load_manifest(root).tokenizer["path"], tok)
    edit_manifest(root, lambda m: m["tokenizer"].update(path=str(tok)))
    with open(tok / "tokenizer.json", "a") as f:
        f.write("\n")
    assert main(["verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json: sha256 differs" in err
    shutil.rmtree(tok)  # moved away: the data is still checked, the tokenizer reported unchecked
    assert main(["verify", str(root)]) == 0
    assert "not checked" in capsys.readouterr().out


def test_verify_refuses_shard_paths_outside_the_dataset(dataset, tmp_path, capsys):
    root = copy_of(dataset, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    prefix = json.loads((root / "manifest.json").read_text())["shards"][0]["prefix"]
    for suffix in (".bin", ".idx"):  # an intact shard, only moved: only its path is wrong
        shutil.move(root / (prefix + suffix), outside / ("00000" + suffix))
    edit_manifest(root, lambda m: m["shards"][0].update(prefix="../outside/00000"))
    assert main(["verify", str(root)]) == 2
    assert "'../outside/00000' leaves the dataset directory" in capsys.readouterr().err


# --- resume fingerprint -------------------------------------------------------------------
class Crash(Exception):
    pass


def test_an_input_edited_between_kill_and_rerun_is_refused(docs, gpt2_tokenizer_dir, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl(docs))
    real, calls = os.replace, [0]

    def crash_after_two_shards(src, dst):
        calls[0] += 1
        if calls[0] > 6:  # .bin, .idx, state per shard
            raise Crash()
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_two_shards)
    with pytest.raises(Crash):
        build_mod.build(build_mod.BuildOptions(inputs=[str(corpus)], tokenizer=str(gpt2_tokenizer_dir),
                                               output=str(tmp_path / "out"), shard_size=8 << 10, val_fraction=0.1,
                                               batch_bytes=8 << 10))
    monkeypatch.setattr(os, "replace", real)
    data = corpus.read_bytes()  # the same size, other content: one word edited in place
    corpus.write_bytes(data.replace(b"Janet", b"Jonet", 1))
    assert corpus.stat().st_size == len(data) and corpus.read_bytes() != data
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "out", "--shard-size", "8K") == 2
    assert "unfinished build with other inputs" in capsys.readouterr().err


# --- inputs -----------------------------------------------------------------------------
def test_a_symlink_loop_in_a_recursive_glob_reads_each_file_once(docs, gpt2_tokenizer_dir, tmp_path):
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "docs.jsonl").write_bytes(jsonl(docs[:20]))
    os.symlink("../L", tmp_path / "L" / "self")
    os.symlink("../L", tmp_path / "L" / "again")  # two loops: glob.glob's matches grow exponentially
    os.symlink("docs.jsonl", tmp_path / "L" / "alias.jsonl")  # the same file under another name
    assert build(f"{tmp_path}/L/**/*.jsonl", gpt2_tokenizer_dir, tmp_path / "out") == 0
    assert documents(tmp_path / "out") == 20


def _truncated_zst(texts):
    data = zstandard.ZstdCompressor().compress(jsonl(texts))
    return data[: len(data) * 2 // 3]


def _truncated_gz(texts):
    data = gzip.compress(jsonl(texts))
    return data[: len(data) * 2 // 3]


def _corrupt_zst(texts):
    data = bytearray(zstandard.ZstdCompressor().compress(jsonl(texts)))
    data[4:12] = b"\xff" * 8  # the frame header
    return bytes(data)


@pytest.mark.parametrize("make,suffix", [(_truncated_zst, ".jsonl.zst"), (_truncated_gz, ".jsonl.gz"),
                                         (_corrupt_zst, ".jsonl.zst")])
def test_decompression_errors_name_the_file_and_obey_on_error(docs, gpt2_tokenizer_dir, tmp_path, capsys, make,
                                                              suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(make(docs[:100]))
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(docs[100:110]))
    assert build([good, bad], gpt2_tokenizer_dir, tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "truncated or corrupt" in err
    assert "Traceback" not in err
    assert build([good, bad], gpt2_tokenizer_dir, tmp_path / "o2", "--on-error", "skip") == 0
    assert skipped(tmp_path / "o2") == {"corrupt_compressed_file": 1}
    assert 10 <= documents(tmp_path / "o2") < 110  # the good file, and what came before the damage


def test_a_lone_surrogate_is_invalid_text(docs, gpt2_tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "s.jsonl"
    bad.write_bytes(jsonl(docs[:3]) + b'{"text": "broken \\ud800 text"}\n' + jsonl(docs[3:5]))
    assert build(bad, gpt2_tokenizer_dir, tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}:4" in err and "surrogate" in err
    assert build(bad, gpt2_tokenizer_dir, tmp_path / "o2", "--on-error", "skip") == 0
    assert skipped(tmp_path / "o2") == {"invalid_text": 1} and documents(tmp_path / "o2") == 5
    assert main(["tokenizer", "train", "--input", str(bad), "--output", str(tmp_path / "spm"),
                 "--vocab-size", "300", "--workers", "1"]) == 2
    assert f"{bad}:4" in capsys.readouterr().err


def test_too_long_documents_are_bad_records(docs, gpt2_tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl(docs[:3]) + jsonl(["word " * 1_000_000]) + jsonl(docs[3:5]))  # 5M characters
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "o1") == 2  # the default limit: 4M
    err = capsys.readouterr().err
    assert f"{corpus}:4" in err and "5,000,000 characters" in err and "--max-doc-chars" in err
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "o2", "--on-error", "skip") == 0
    assert skipped(tmp_path / "o2") == {"too_long": 1} and documents(tmp_path / "o2") == 5
    limit = sorted(len(d) for d in docs[:5])[2]  # two of the five are longer
    assert build(corpus, gpt2_tokenizer_dir, tmp_path / "o3", "--on-error", "skip", "--max-doc-chars",
                 str(limit)) == 0
    assert skipped(tmp_path / "o3") == {"too_long": 3} and documents(tmp_path / "o3") == 3


def test_a_long_document_keeps_memory_flat(gpt2_tokenizer_dir, tmp_path):
    """50 MB on one line peaked at 6.4 GB; now it is a counted skip and memory stays small."""
    corpus = tmp_path / "big.jsonl"
    with open(corpus, "w") as f:
        f.write(json.dumps({"text": "Short document."}) + "\n")
        f.write(json.dumps({"text": "lorem ipsum " * 4_200_000}) + "\n")
    code = ("import resource, sys; from data_prep.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    proc = subprocess.run([sys.executable, "-c", code, "build", "--input", str(corpus), "--tokenizer",
                           str(gpt2_tokenizer_dir), "--output", str(tmp_path / "out"), "--on-error", "skip"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    rc, peak_mib = map(int, proc.stdout.split()[-2:])
    assert rc == 0, proc.stderr[-2000:]
    assert skipped(tmp_path / "out") == {"too_long": 1}
    print(f"peak RSS {peak_mib} MiB")
    assert peak_mib < 1500  # the text itself is ~100 MB as JSON line + str; tokenizing it took ~6 GB


# --- output -----------------------------------------------------------------------------
def _unwritable(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    for parent in (ro, Path("/sys")):  # root ignores modes; /sys refuses even root
        try:
            (parent / "data-prep-probe").mkdir()
        except PermissionError:
            return parent / "data-prep-out"
        (parent / "data-prep-probe").rmdir()
    pytest.skip("no unwritable directory here")


def test_an_unwritable_output_is_a_clear_error(docs, gpt2_tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl(docs[:5]))
    out = _unwritable(tmp_path)
    assert build(corpus, gpt2_tokenizer_dir, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the output") and "Traceback" not in err


def test_a_build_with_every_record_skipped_is_an_error(gpt2_tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": ""}\n{"text": broken}\n{"other": "x"}\n')
    assert build(bad, gpt2_tokenizer_dir, tmp_path / "out", "--on-error", "skip") == 2
    err = capsys.readouterr().err
    assert "no documents to write" in err and "empty_text=1" in err and "invalid_json=1" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rerunning_a_finished_build_is_idempotent(dataset, tmp_path, capsys):
    raw = json.loads((dataset / "manifest.json").read_text())
    args = ["build", "--input", raw["inputs"][0], "--tokenizer", raw["tokenizer"]["path"], "--output", str(dataset),
            "--val-fraction", "0.1", "--shard-size", "16K"]  # the command that built it
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before  # nothing rewritten
    assert main([*args, "--val-fraction", "0.2"]) == 2  # another command still refused
    assert "already holds a finished dataset" in capsys.readouterr().err
