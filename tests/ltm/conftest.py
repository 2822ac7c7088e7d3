"""Fixtures for the LTM tests: a small real-text shard directory (built once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cpu_ds(**changes) -> dict:
    """ds_configs/zero2_cpu.json with top-level changes (fp32, torch AdamW: it is the CPU config)."""
    ds = json.loads((ROOT / "ds_configs" / "zero2_cpu.json").read_text())
    ds.update(changes)
    return ds


@pytest.fixture(scope="session")
def ltm_data(tmp_path_factory, shared_data) -> Path:
    """Shards of 8 GSM8K questions+answers repeated 30 times, a 512-piece sentencepiece."""
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("ltm_data")
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:8]]
    docs = [f"Copy {i}. {rows[i % 8]['question']}\n{rows[i % 8]['answer']}" for i in range(240)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = root / "spm"
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tok), "--vocab-size", "512",
                 "--workers", "1"]) in (0, None)
    out = root / "shards"
    assert main(["build", "--input", str(corpus), "--tokenizer", f"{tok}.model", "--output", str(out),
                 "--val-fraction", "0.2", "--workers", "1"]) in (0, None)
    return out
