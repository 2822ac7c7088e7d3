"""Fixtures for the data tests: small real-text corpora written into a tmp dir."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text: naïve café, 東京, emoji 🙂 and a tab\there.",
    "Multi-line\ndocument with  double  spaces\n\nand a blank line.",
    "  leading and trailing spaces  ",
    "<|endoftext|> appears literally inside this text.",
]


def _write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    data = "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def gsm8k_questions(shared_data: Path, n: int | None = None) -> list[str]:
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()
    qs = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in lines]
    return qs[:n] if n else qs


@pytest.fixture
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture(scope="session")
def gsm8k(shared_data) -> list[str]:
    """GSM8K test questions + answers: real English with numbers and markup."""
    return gsm8k_questions(shared_data)


@pytest.fixture(scope="session")
def write_jsonl():
    """`write_jsonl(path, texts, key="text")`: .jsonl, .jsonl.gz or .jsonl.zst by suffix."""
    return _write_jsonl
