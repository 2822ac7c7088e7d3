"""Fixtures for the training tests: a small repeated real-text corpus, CPU DeepSpeed configs."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(autouse=True)
def _mlflow_uri_restored():
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into this process's environment: a
    Tracker made in one test would otherwise send a later test's spawned ranks to its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, repeated_gsm8k_shards) -> Path:
    """Shards of 8 GSM8K questions+answers repeated 40 times (a 512-piece sentencepiece),
    so a tiny model's loss visibly falls within a few dozen steps."""
    return repeated_gsm8k_shards(tmp_path_factory.mktemp("train_data"), copies=320)
