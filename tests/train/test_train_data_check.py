"""Training checks its shards before the first step (issue 19): damaged data is an error, not a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.train.configs import load_task
from pipeline.train.task import BatchLayout

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = BatchLayout(micro_batch=2, accumulation=1, world=1, rank=0, device=torch.device("cpu"))


def _edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _first(root: Path, suffix: str) -> Path:
    return root / (json.loads((root / "manifest.json").read_text())["shards"][0]["prefix"] + suffix)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)


def _edit_counts(raw: dict) -> None:  # a shard's documents and the totals, edited consistently
    raw["shards"][0]["documents"] += 1
    for k in (raw["shards"][0]["split"], "all"):
        raw["totals"][k]["documents"] += 1


DAMAGE = {
    "truncated_bin": (lambda r: _truncate(_first(r, ".bin")), ".bin: "),
    "truncated_idx": (lambda r: _truncate(_first(r, ".idx")), ".idx: "),
    "deleted_idx": (lambda r: _first(r, ".idx").unlink(), ".idx: missing"),
    "edited_counts": (lambda r: _edit_manifest(r, _edit_counts), "manifest says"),
    "edited_totals": (lambda r: _edit_manifest(r, lambda m: m["totals"]["all"].update(tokens=1)), "'totals'"),
    "incomplete": (lambda r: _edit_manifest(r, lambda m: m.update(complete=False)), "incomplete"),
}


@pytest.fixture
def damaged(corpus_dir, tmp_path):
    def make(kind: str) -> Path:
        root = tmp_path / kind
        shutil.copytree(corpus_dir, root)
        DAMAGE[kind][0](root)
        return root
    return make


def _build(data: Path, *overrides: str):
    task = load_task("tiny-h1", [f"data.path={data}", *overrides])
    return task.build(LAYOUT)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_shards_stop_training_before_the_first_step(damaged, kind):
    with pytest.raises(PipelineError, match=DAMAGE[kind][1].replace("(", r"\(")):
        _build(damaged(kind))


def test_a_flipped_byte_is_found_with_data_verify(corpus_dir, tmp_path):
    root = tmp_path / "flipped"
    shutil.copytree(corpus_dir, root)
    _flip(_first(root, ".bin"))
    _build(root)  # the start-up check reads sizes and indexes only: a flipped data byte passes it
    with pytest.raises(PipelineError, match="sha256 differs"):
        _build(root, "data.verify=true")
    _build(corpus_dir, "data.verify=true")  # intact data passes the full pass


def test_the_launcher_reports_damaged_data_as_an_error(damaged, tmp_path):
    data = damaged("deleted_idx")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/zero2_cpu.json", "--config", "tiny-h1",
         f"data.path={data}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.export=false",
         "tracking.enabled=false"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "error: " in proc.stderr and ".idx: missing" in proc.stderr and "Traceback" not in proc.stderr
