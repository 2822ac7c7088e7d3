"""Checkpoints that are torn, corrupt or hostile, under real DeepSpeed (ZeRO-2, 2 gloo ranks).

The toy regression task of test_task_boundary trains here (a second of DeepSpeed per run).
Each corruption is what was seen or what an attacker would do:
- a rank killed mid-save: `latest` names a tag whose rank-1 optimizer file is cut short and
  whose pipeline_config.json is missing (before: every `--resume auto` failed on it);
- a flipped byte (before: loaded silently), a truncated file, `latest` naming a missing tag;
- a `.pt` file replaced by a pickle that runs a command when loaded, with the completion
  record rewritten to match (before: export and resume ran it);
- an export directory that is not an export (before: `--overwrite` deleted it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # conftest, as test_task_boundary imports it in the ranks

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.train.testing import run_distributed  # noqa: E402
from tests.train.test_task_boundary import ToyRegression, _cfg, _ds, _metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launchers"))

import export as export_cli  # noqa: E402

MODEL_FILE = "mp_rank_00_model_states.pt"
RANK1_OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling this runs a shell command (creates `marker`): what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(tag_dir: Path, marker: Path, name: str = MODEL_FILE) -> None:
    """Replace file `name` with a payload, and rewrite complete.json to vouch for it
    (an attacker edits both; the checksums are for accidents, not for attacks)."""
    import hashlib

    torch.save({"module": {}, "payload": Payload(marker)}, tag_dir / name)
    record = json.loads((tag_dir / "complete.json").read_text())
    data = (tag_dir / name).read_bytes()
    record["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag_dir / "complete.json").write_text(json.dumps(record))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _attempt(fn, *args, **kwargs) -> str | None:
    """None if `fn` ran, else the PipelineError message (any other error fails the test)."""
    try:
        fn(*args, **kwargs)
        return None
    except PipelineError as exc:
        return str(exc)


def checkpoint_checks(out: Path) -> dict[str, Any]:
    """Every run, on each of 2 ranks; rank 0 damages files between barriers."""
    import torch.distributed as dist

    from pipeline.train.trainer import train

    rank = dist.get_rank()
    r: dict[str, Any] = {}
    straight = train(ToyRegression(_cfg(out / "straight", checkpoint_every=1)), _ds(2, 1))
    r["straight_losses"] = [m["loss"] for m in _metrics(out / "straight")]
    r["straight_export"] = str(straight.export_dir)

    # a rank killed mid-save of step 4: latest -> step4, rank 1's optimizer file cut, no marker
    torn = out / "torn"
    train(ToyRegression(_cfg(torn, checkpoint_every=1, stop_after_steps=4)), _ds(2, 1))
    ckpts = torn / "checkpoints"
    if rank == 0:
        step4 = ckpts / "step4"
        with open(step4 / RANK1_OPTIM, "r+b") as f:
            f.truncate((step4 / RANK1_OPTIM).stat().st_size * 4 // 5)
        (step4 / "pipeline_config.json").unlink()
        (step4 / "complete.json").unlink(missing_ok=True)  # a kill before the marker: it never existed
        (ckpts / "latest").write_text("step4")
    dist.barrier()
    res = train(ToyRegression(_cfg(torn, checkpoint_every=1)), _ds(2, 1), resume="auto")
    r["torn"] = {"step": res.step, "finished": res.finished, "losses": [m["loss"] for m in _metrics(torn)],
                 "steps": [m["step"] for m in _metrics(torn)]}

    # killed after logging steps 3 and 4 but before their checkpoint: resume replays them from step 2
    replay = out / "replay"
    train(ToyRegression(_cfg(replay, checkpoint_every=2, stop_after_steps=4)), _ds(2, 1))
    if rank == 0:
        shutil.rmtree(replay / "checkpoints" / "step4")
        (replay / "checkpoints" / "latest").write_text("step2")
    dist.barrier()
    train(ToyRegression(_cfg(replay, checkpoint_every=2)), _ds(2, 1), resume="auto")
    r["replay_steps"] = [m["step"] for m in _metrics(replay)]
    r["replay_losses"] = [m["loss"] for m in _metrics(replay)]

    # damaged complete checkpoints of the straight run, each resumed explicitly
    ckpts = out / "straight" / "checkpoints"
    marker = out / "resume_payload_ran"
    if rank == 0:
        flip_byte(ckpts / "step1" / MODEL_FILE)
        with open(ckpts / "step2" / RANK1_OPTIM, "r+b") as f:
            f.truncate(1000)
        plant_payload(ckpts / "step3", marker)
        plant_payload(ckpts / "step4", marker, RANK1_OPTIM)  # read by rank 1 alone
        shutil.copytree(ckpts, out / "dangling")
        shutil.rmtree(out / "dangling" / "step6")  # `latest` names step6
    dist.barrier()
    r["errors"] = {}
    for name, what in {"flipped": ckpts / "step1", "truncated": ckpts / "step2", "payload": ckpts / "step3",
                       "payload_rank1": ckpts / "step4", "dangling": out / "dangling"}.items():
        cfg = _cfg(out / f"resume_{name}")
        r["errors"][name] = _attempt(train, ToyRegression(cfg), _ds(2, 1), resume=str(what))
    r["resume_payload_ran"] = marker.exists()
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    return run_distributed(checkpoint_checks, out, world_size=2), out


def test_a_checkpoint_completes_with_a_marker_of_every_file(runs):
    (r0, _), out = runs
    tag = out / "straight" / "checkpoints" / "step6"
    record = json.loads((tag / "complete.json").read_text())
    on_disk = {str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name != "complete.json"}
    assert set(record["files"]) == on_disk  # both ranks' optimizer files, model states, task record
    assert {RANK1_OPTIM, MODEL_FILE, "task.json"} <= on_disk
    assert all(len(info["sha256"]) == 64 and info["bytes"] > 0 for info in record["files"].values())
    assert (out / "straight" / "checkpoints" / "latest").read_text() == "step6"


def test_resume_auto_skips_a_torn_checkpoint_and_says_so(runs):
    (r0, r1), out = runs
    torn = r0["torn"]
    assert torn["finished"] and torn["step"] == 6
    assert torn["losses"] == r0["straight_losses"]  # resumed from step 3, exactly
    assert r1["torn"]["losses"] == torn["losses"]
    from pipeline.train.checkpoint import choose_auto

    ckpts = out / "torn" / "checkpoints"
    shutil.rmtree(ckpts / "step5")
    shutil.copytree(ckpts / "step6", ckpts / "step7")
    (ckpts / "step7" / "complete.json").unlink()
    chosen, skipped = choose_auto(ckpts)
    assert chosen == ckpts / "step6"
    assert skipped == [("step7", "incomplete: no complete.json (its save was interrupted)")]


def test_metrics_drop_rows_past_the_resumed_step(runs):
    (r0, _), _ = runs
    assert r0["replay_steps"] == [1, 2, 3, 4, 5, 6]  # before: 1, 2, 3, 4, 3, 4, 5, 6
    assert r0["replay_losses"] == r0["straight_losses"]


@pytest.mark.parametrize("case,words", [
    ("flipped", f"step1/{MODEL_FILE}: its sha256 differs"),
    ("truncated", f"step2/{RANK1_OPTIM}: 1000 bytes, but"),
    ("payload", f"step3/{MODEL_FILE}: refused to load"),
    ("payload_rank1", f"step4/{RANK1_OPTIM}: refused to load"),
    ("dangling", "names the tag 'step6'"),
])
def test_resume_of_a_corrupt_checkpoint_is_a_clear_error_on_every_rank(runs, case, words):
    (r0, r1), _ = runs
    for r in (r0, r1):
        assert r["errors"][case] is not None and words in r["errors"][case], r["errors"][case]


def test_resume_never_runs_a_planted_payload(runs):
    (r0, _), _ = runs
    assert r0["errors"]["payload"] is not None and r0["errors"]["payload_rank1"] is not None
    assert not r0["resume_payload_ran"]


def test_export_never_runs_a_planted_payload(runs, tmp_path, capsys):
    _, out = runs
    tag = tmp_path / "checkpoints" / "step6"
    shutil.copytree(out / "straight" / "checkpoints" / "step6", tag)
    marker = tmp_path / "export_payload_ran"
    plant_payload(tag, marker)
    assert export_cli.main([str(tag), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "refused to load" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("damage,words", [
    ("flip", "its sha256 differs"),
    ("truncate", "bytes, but"),
    ("dangling", "does not exist"),
    ("no_marker", "incomplete checkpoint"),
    ("record", "expected an object with a task 'kind'"),
])
def test_export_of_a_corrupt_checkpoint_is_a_clear_error(runs, tmp_path, capsys, damage, words):
    _, out = runs
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(out / "straight" / "checkpoints" / "step6", ckpts / "step6")
    (ckpts / "latest").write_text("step6")
    tag = ckpts / "step6"
    if damage == "flip":
        flip_byte(tag / RANK1_OPTIM)
    elif damage == "truncate":
        with open(tag / MODEL_FILE, "r+b") as f:
            f.truncate(100)
    elif damage == "dangling":
        (ckpts / "latest").write_text("step9")
    elif damage == "no_marker":
        (tag / "complete.json").unlink()
    else:
        (tag / "task.json").write_text("{}")
    assert export_cli.main([str(ckpts), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err


def test_export_overwrite_replaces_only_a_previous_export(runs, tmp_path, capsys):
    _, out = runs
    tag = str(out / "straight" / "checkpoints" / "step6")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for flags in ([], ["--overwrite"]):
        assert export_cli.main([tag, str(foreign), *flags]) == 2
        assert "not an export" in capsys.readouterr().err
        assert (foreign / "thesis.tex").read_text() == "years of work"

    target = tmp_path / "export"
    assert export_cli.main([tag, str(target)]) == 0
    assert json.loads((target / "export.json").read_text())["step"] == 6
    assert export_cli.main([tag, str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (target / "stale").write_text("from the previous export")
    assert export_cli.main([tag, str(target), "--overwrite"]) == 0
    assert (target / "model.safetensors").is_file() and not (target / "stale").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli.main([tag, str(empty)]) == 0  # an empty directory is fine


def save_every_precision(out: Path) -> dict[str, list[str]]:
    """One step and a save of a small model under ZeRO 1-3 in bf16 and fp16 (the GPU configs'
    precisions, which the CPU runs above turn off); the `.pt` files `safe_load` read back."""
    import deepspeed
    from torch import nn

    from pipeline.train.checkpoint import safe_load

    read = {}
    for stage in (1, 2, 3):
        for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
            ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, dtype: {"enabled": True},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
            engine.backward(engine(torch.randn(2, 8, dtype=torch_dtype)).float().pow(2).mean())
            engine.step()
            engine.save_checkpoint(str(out / f"zero{stage}_{dtype}"), tag="t")
            files = sorted((out / f"zero{stage}_{dtype}" / "t").glob("*.pt"))
            for f in files:
                safe_load(f)
            read[f"zero{stage}_{dtype}"] = [f.name for f in files]
    return read


def test_the_allow_list_reads_every_zero_stage_in_bf16_and_fp16(tmp_path):
    [read] = run_distributed(save_every_precision, tmp_path, world_size=1)
    assert len(read) == 6
    for name, files in read.items():
        assert any("optim_states" in f for f in files) and any("model_states" in f for f in files), (name, files)
