"""Loop settings that cannot run are config errors, all reported at once, before any start.

Before: train.max_steps<=0 "succeeded" having trained nothing, data.seq_len=0 and
train.log_every=0 divided by zero, train.eval_sequences=0 logged a validation loss of 0.0,
train.checkpoint_every=-1 saved every step, and a seq_len beyond the model's positions
failed only after DeepSpeed had started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launchers"))

import pretrain  # noqa: E402

BAD = {
    "train.max_steps=0": "train.max_steps=0: must be >= 1",
    "train.max_steps=-5": "train.max_steps=-5: must be >= 1",
    "data.seq_len=0": "data.seq_len=0: must be >= 2",
    "train.log_every=0": "train.log_every=0: must be >= 1",
    "train.eval_sequences=0": "train.eval_sequences=0: must be >= 1",
    "train.checkpoint_every=-1": "train.checkpoint_every=-1: must be >= 0",
    "train.eval_every=-1": "train.eval_every=-1: must be >= 0",
    "data.seq_len=4096": "data.seq_len=4096 exceeds the max_position_embeddings=128",
}


@pytest.mark.parametrize("override", BAD)
def test_each_unrunnable_setting_is_a_config_error(override):
    with pytest.raises(PipelineError, match=BAD[override].replace("(", r"\(")):
        load_config("tiny-liu", [override])


def test_reasoning_presets_check_their_loop_too():
    from pipeline.train.configs import load_task_config

    with pytest.raises(PipelineError, match="train.log_every=0"):
        load_task_config("reason-prosqa-cot", ["train.log_every=0"])


def test_dry_run_reports_every_error_without_starting_deepspeed(tmp_path, capsys):
    import torch.distributed

    ds = json.loads((ROOT / "ds_configs" / "zero2_cpu.json").read_text())
    ds["train_batch_size"] = 3  # 4 x 1 x 1 rank = 4: wrong too
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    overrides = ["train.max_steps=0", "data.seq_len=0", "train.log_every=0", "train.eval_sequences=0",
                 "train.checkpoint_every=-1"]
    rc = pretrain.main(["--ds_config", str(tmp_path / "ds.json"), "--config", "tiny-liu", *overrides, "--dry-run"])
    assert rc == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("error: ") for line in lines)
    for key in ("train.max_steps=0", "data.seq_len=0", "train.log_every=0", "train.eval_sequences=0",
                "train.checkpoint_every=-1", "train_batch_size=3"):
        assert sum(key in line for line in lines) == 1, (key, lines)
    assert not torch.distributed.is_initialized()


def test_seq_len_beyond_positions_fails_before_distributed_start(capsys):
    import torch.distributed

    rc = pretrain.main(["--ds_config", str(ROOT / "ds_configs/zero2_cpu.json"), "--config", "tiny-liu",
                        "data.path=nowhere", "data.seq_len=4096"])
    assert rc == 2 and "max_position_embeddings=128" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_seq_len_beyond_a_model_path_s_positions_is_a_config_error(tmp_path):
    from pipeline.models import build_model, preset

    build_model(preset("gpt2-tiny", vocab_size=64)).save_pretrained(tmp_path / "base")
    with pytest.raises(PipelineError, match=r"data.seq_len=256 exceeds the max_position_embeddings=128 of .*base"):
        load_config("tiny-liu", [f"model.path={tmp_path}", "data.seq_len=256"])
    assert load_config("tiny-liu", [f"model.path={tmp_path}", "data.seq_len=128"]).data.seq_len == 128


def test_every_paper_size_reasoning_preset_has_its_qwen3_twin():
    """Paper 000 Table 2 runs GPT-2 124M and Qwen3-0.6B: each reason-<task>-<system>-gpt2-124m
    preset has a -qwen3-0.6b twin with the same task kind, variant, curriculum and data, on a
    Qwen3-0.6B model (its own preset, or the Qwen CoT export it starts from)."""
    import dataclasses

    from pipeline.train.configs import load_task_config

    gpt2 = sorted(p.stem for p in (ROOT / "pipeline" / "presets").glob("reason-*-gpt2-124m.yaml"))
    assert len(gpt2) == 24  # 3 tasks x (cot, nocot, 5 dual variants, coconut)
    for name in gpt2:
        kind_g, g = load_task_config(name)
        kind_q, q = load_task_config(name.replace("gpt2-124m", "qwen3-0.6b"))
        assert kind_q == kind_g, name
        for section in ("curriculum", "dual"):
            if hasattr(g, section):
                assert dataclasses.asdict(getattr(q, section)) == dataclasses.asdict(getattr(g, section)), name
        assert q.data.train_file == g.data.train_file and q.data.max_len == g.data.max_len, name
        if g.model.path:  # starts from the same-size CoT export
            assert q.model.path == g.model.path.replace("gpt2-124m", "qwen3-0.6b"), name
        else:
            assert (g.model.preset, q.model.preset) == ("gpt2-124m", "qwen3-0.6b"), name
        assert q.model.activation_checkpointing, name
