"""Fixtures for the training tests: a small repeated real-text corpus, CPU DeepSpeed configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cpu_ds_config(name: str = "zero2_cpu", **changes) -> dict:
    """A shipped ds_config made CPU-runnable (fp32, torch Adam), with top-level changes."""
    ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    ds.get("bf16", {})["enabled"] = False
    ds["optimizer"]["params"]["torch_adam"] = True
    ds["zero_optimization"].pop("offload_optimizer", None)
    ds.update(changes)
    return ds


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, shared_data) -> Path:
    """Shards of 8 GSM8K questions+answers repeated 40 times (a 512-piece sentencepiece),
    so a tiny model's loss visibly falls within a few dozen steps."""
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("train_data")
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:8]]
    # "Copy i." keeps the documents distinct, so the hashed split puts copies on both sides.
    docs = [f"Copy {i}. {rows[i % 8]['question']}\n{rows[i % 8]['answer']}" for i in range(320)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = root / "spm"
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tok), "--vocab-size", "512",
                 "--workers", "1"]) in (0, None)
    out = root / "shards"
    assert main(["build", "--input", str(corpus), "--tokenizer", f"{tok}.model", "--output", str(out),
                 "--val-fraction", "0.2", "--workers", "1"]) in (0, None)
    return out
