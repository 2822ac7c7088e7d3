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
def ltm_data(tmp_path_factory, repeated_gsm8k_shards) -> Path:
    """Shards of 8 GSM8K questions+answers repeated 30 times, a 512-piece sentencepiece."""
    return repeated_gsm8k_shards(tmp_path_factory.mktemp("ltm_data"), copies=240)
