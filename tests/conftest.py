"""Shared fixtures: paths to the public data beside the checkout, GPU skipping."""

from __future__ import annotations

import pytest
import torch

from pipeline.paths import shared_data_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set PIPELINE_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_data):
    return shared_data / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def repeated_gsm8k_shards(shared_data):
    """`make(root, copies)`: shards of `copies` documents cycling over 8 GSM8K questions+answers
    ("Copy i." keeps them distinct, so the hashed split puts copies on both sides), tokenized by
    a 512-piece sentencepiece trained on them: a tiny model's loss visibly falls within a few
    dozen steps."""
    import json

    from data_prep.cli import main

    def make(root, copies: int):
        rows = [json.loads(x) for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:8]]
        docs = [f"Copy {i}. {rows[i % 8]['question']}\n{rows[i % 8]['answer']}" for i in range(copies)]
        corpus = root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tok = root / "spm"
        assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tok), "--vocab-size", "512",
                     "--workers", "1"]) in (0, None)
        out = root / "shards"
        assert main(["build", "--input", str(corpus), "--tokenizer", f"{tok}.model", "--output", str(out),
                     "--val-fraction", "0.2", "--workers", "1"]) in (0, None)
        return out

    return make
