"""Fixtures for the evaluation tests: a small GPT-2-tokenized shard dir and tiny exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.dual import DualConfig, DualModel, export_dual
from pipeline.models import build_model, preset

EOS = 50256  # GPT-2's <|endoftext|>
K = 8


def tiny_base(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(preset("gpt2-tiny", vocab_size=50257, eos_token_id=EOS))


def tiny_dual(variant: str, seed: int = 0) -> DualModel:
    base = tiny_base(seed)
    torch.manual_seed(seed + 1)
    return DualModel(base, DualConfig(variant=variant, n_latents=3, n_ahead=4, n_sites=4), eos_id=EOS)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, shared_data, gpt2_tokenizer_dir) -> Path:
    """~30 validation documents of GSM8K text (40-200 GPT-2 tokens each)."""
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("eval_data")
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:60]]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["question"] + "\n" + r["answer"]}) + "\n" for r in rows))
    out = root / "shards"
    rc = main(["build", "--input", str(corpus), "--tokenizer", str(gpt2_tokenizer_dir), "--output", str(out),
               "--val-fraction", "0.5", "--workers", "1"])
    assert rc in (0, None)
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory, shard_dir) -> dict[str, Path]:
    """Exports of a liu and an h1 dual model (trained on `shard_dir`), and a plain HF base."""
    root = tmp_path_factory.mktemp("eval_models")
    out = {}
    for variant in ("liu", "h1"):
        out[variant] = export_dual(tiny_dual(variant), root / variant, run_config={"data": {"path": str(shard_dir)}})
    tiny_base().save_pretrained(root / "hf_base")
    out["hf_base"] = root / "hf_base"
    return out
