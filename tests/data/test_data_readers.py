"""Corpus readers: formats, compression, partition ownership, and the bad-input corpus."""

from __future__ import annotations

import json
import os
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import readers
from pipeline.errors import PipelineError


def read_all(specs, **kw) -> tuple[list[str], readers.Reader]:
    r = readers.Reader(readers.resolve_inputs([str(s) for s in specs]), **kw)
    return [t for t, _, _ in r], r


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, name, texts, write_jsonl):
    got, _ = read_all([write_jsonl(tmp_path / name, texts)])
    assert got == texts


def test_json_parquet_txt_and_glob_order(tmp_path, texts):
    TEXTS = texts
    (tmp_path / "b.json").write_text(json.dumps([{"body": t} for t in TEXTS[:2]]))
    pq.write_table(pa.table({"body": TEXTS[2:4]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("para one\nline two\n\n\npara two\n")
    got, _ = read_all([tmp_path / "*.json", tmp_path / "*.parquet", tmp_path / "d.txt"], text_key="body")
    assert got == [*TEXTS[:4], "para one\nline two\n\n\npara two\n"]
    texts, _ = read_all([tmp_path / "d.txt"], txt_unit="paragraph")
    assert texts == ["para one\nline two", "para two"]
    texts, _ = read_all([tmp_path / "d.txt"], txt_unit="line")
    assert texts == ["para one", "line two", "para two"]


def test_hf_dataset_on_disk(tmp_path, texts):
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    got, _ = read_all([tmp_path / "ds"])
    assert got == texts


def test_pydocs_is_real_english_and_deterministic():
    first = list(islice(readers.pydocs_documents(), 5))
    assert first == list(islice(readers.pydocs_documents(), 5))
    assert all(isinstance(t, str) and len(t) > 50 for t in first)
    assert " the " in " ".join(first)


def test_keep_skips_unowned_records_before_parsing(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\nnot json at all\n{"text": "three"}\n')
    r = readers.Reader(readers.resolve_inputs([str(path)]), keep=lambda src, rec: rec != 2)
    assert [(t, rec) for t, _, rec in r] == [("one", 1), ("three", 3)]


BAD_LINES = [
    (b'{"text": "ok"}', None),
    (b'{"text": "broken', "invalid_json"),
    (b'{"text": "bad \xff\xfe utf8"}', "invalid_utf8"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": "  \\n\\t "}', "empty_text"),
    (b'{"body": "no text key"}', "missing_key"),
    (b'{"text": 42}', "non_string_text"),
    (b'["a list"]', "not_an_object"),
]


@pytest.mark.parametrize("line,reason", [b for b in BAD_LINES if b[1]])
def test_bad_record_fails_with_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(PipelineError) as e:
        read_all([path])
    assert f"{path}:2" in str(e.value) and "--on-error skip" in str(e.value)


def test_bad_corpus_is_skipped_and_counted(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    (tmp_path / "locked.jsonl").write_text('{"text": "secret"}\n')
    os.chmod(tmp_path / "locked.jsonl", 0)
    texts, r = read_all([tmp_path / "bad.jsonl", tmp_path / "binary.txt", tmp_path / "locked.jsonl"],
                        on_error="skip")
    assert texts == ["ok"] + (["secret"] if os.access(tmp_path / "locked.jsonl", os.R_OK) else [])
    expected = {"invalid_json": 1, "invalid_utf8": 1, "empty_text": 2, "missing_key": 1,
                "non_string_text": 1, "not_an_object": 1, "binary_file": 1}
    if not os.access(tmp_path / "locked.jsonl", os.R_OK):  # root can read anything
        expected["unreadable_file"] = 1
    assert dict(r.skips) == expected


def test_binary_and_missing_inputs_fail_clearly(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b"\x00\x01binary")
    with pytest.raises(PipelineError, match="looks binary"):
        read_all([tmp_path / "x.jsonl"])
    with pytest.raises(PipelineError, match="matches no files"):
        readers.resolve_inputs([str(tmp_path / "nope-*.jsonl")])
    with pytest.raises(PipelineError, match="unknown file type"):
        readers.resolve_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(PipelineError, match="cannot read"):
        read_all([tmp_path / "missing.jsonl"])
