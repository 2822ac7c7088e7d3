"""Every shipped DeepSpeed config parses with DeepSpeed's own config class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))


def test_the_documented_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero2_cpu.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ds_config_parses(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    cfg = DeepSpeedConfig(raw)
    expected_stage = int(path.stem[len("zero")])
    assert cfg.zero_optimization_stage == expected_stage
    assert cfg.gradient_clipping > 0, "gradient clipping must be explicit"
    assert cfg.train_batch_size == raw["train_micro_batch_size_per_gpu"] * raw["gradient_accumulation_steps"]
    if "cpu" in path.stem:
        # No compiled CPU Adam on CPU configs, and no bf16 autocast.
        assert cfg.optimizer_params.get("torch_adam") is True
        assert not cfg.bfloat16_config.enabled
    if "offload" in path.stem:
        assert raw["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
