"""Checkpoints of the loop: DeepSpeed's state per tag, plus what makes a tag self-contained.

    checkpoints/
      latest                      the newest *complete* tag (written after its marker)
      step100/
        mp_rank_00_model_states.pt, *_optim_states.pt      DeepSpeed (any ZeRO stage)
        task.json                 {"kind", "step", "config", "meta"}: rebuilds the task anywhere
        pipeline_config.json      the task's config alone, for people
        complete.json             written last: every file's size and sha256

`task.json` is what export reads: the task kind, its resolved config and the
task's `checkpoint_meta()` (data identity, the hash of frozen weights it starts
from), so a checkpoint exports with the data directory gone.

A tag counts only once `complete.json` exists. DeepSpeed writes its own `latest` on
rank 0 without waiting for the other ranks, so a rank killed mid-save used to leave
`latest` naming a torn tag that no resume could load. Here every rank finishes its
files, a barrier passes, the ranks hash the files (each a share), and rank 0 writes
the marker and only then `latest`. Loading checks every recorded size and checksum
first (a flipped byte is an error, not silently different weights), and DeepSpeed's
`.pt` files are unpickled with `weights_only=True`, allowing exactly the few
DeepSpeed types its states hold: a checkpoint can carry weights, never code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.train.task import Task

log = logging.getLogger(__name__)
TASK_FILE = "task.json"
CONFIG_FILE = "pipeline_config.json"
COMPLETE_FILE = "complete.json"
LATEST_FILE = "latest"
_TAG = re.compile(r"step(\d+)")
# What a load of DeepSpeed's files can raise on a damaged or mismatched checkpoint.
LOAD_ERRORS = (RuntimeError, AssertionError, ValueError, KeyError, IndexError, EOFError, OSError,
               pickle.UnpicklingError, zipfile.BadZipFile)


# ---------------------------------------------------------------------- saving
def save(engine: Any, ckpt_dir: Path, step: int, task: Task, meta: dict[str, Any] | None, rank: int) -> Path:
    """Checkpoint `step{step}` on every rank (a collective); complete once this returns."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    tag = f"step{step}"
    tag_dir = ckpt_dir / tag
    if rank == 0:  # re-saving a step (a rerun from an older tag): the old marker must not vouch for new files
        (tag_dir / COMPLETE_FILE).unlink(missing_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    if rank == 0:  # save_checkpoint ends with a barrier: every rank's files are written
        record = {"kind": task.kind, "step": step, "config": task.config_dict(), "meta": meta or {}}
        (tag_dir / TASK_FILE).write_text(json.dumps(record, indent=2))
        (tag_dir / CONFIG_FILE).write_text(json.dumps(record["config"], indent=2))
    _barrier()
    names = _files(tag_dir)
    mine = {name: _describe(tag_dir / name) for name in names[rank::world]}
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    if rank == 0:
        files = {name: info for share in shares for name, info in share.items()}
        _write_atomic(tag_dir / COMPLETE_FILE, json.dumps({"step": step, "world_size": world,
                                                           "files": dict(sorted(files.items()))}, indent=1))
        _write_atomic(ckpt_dir / LATEST_FILE, tag)
    _barrier()
    return tag_dir


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _files(tag_dir: Path) -> list[str]:
    """Every file of a tag (relative paths, sorted) except the marker itself."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE_FILE)


def _describe(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------- finding and checking
def tag_step(tag_dir: Path) -> int | None:
    match = _TAG.fullmatch(tag_dir.name)
    return int(match.group(1)) if match else None


def choose_auto(ckpt_dir: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest complete tag in `ckpt_dir` (None if there is none), and the newer tags
    passed over as (tag, why): `--resume auto` after a kill mid-save takes the one before."""
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir() and tag_step(p) is not None),
                  key=tag_step, reverse=True) if ckpt_dir.is_dir() else []
    skipped = []
    for tag_dir in tags:
        if (tag_dir / COMPLETE_FILE).is_file():
            return tag_dir, skipped
        skipped.append((tag_dir.name, f"incomplete: no {COMPLETE_FILE} (its save was interrupted)"))
    return None, skipped


def resolve(path: str | Path) -> Path:
    """A tag directory, or a checkpoints directory (its `latest` tag), as a tag directory."""
    path = Path(path)
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise PipelineError(f"{latest} names the tag {tag!r}, but {path / tag} does not exist; "
                                f"give a tag directory ({', '.join(sorted(p.name for p in path.glob('step*'))) or 'none'})")
        return path / tag
    if not path.is_dir():
        raise PipelineError(f"{path}: no such checkpoint directory")
    return path


def verify(tag_dir: Path, *, share: tuple[int, int] = (0, 1), scan: bool = False) -> dict[str, Any]:
    """The tag's completion record, after checking that every recorded file is there with
    its size, no unrecorded `.pt` file was added, and (for this rank's `share` = (rank,
    world) of the files) its sha256. `scan` also unpickles each `.pt` of the share with
    `weights_only=True` (memory-mapped, so cheap): for readers that load with their own
    `torch.load`, such as DeepSpeed's zero_to_fp32."""
    marker = tag_dir / COMPLETE_FILE
    if not marker.is_file():
        if not tag_dir.is_dir():
            raise PipelineError(f"{tag_dir}: no such checkpoint tag")
        raise PipelineError(f"{tag_dir}: incomplete checkpoint (no {COMPLETE_FILE}: its save was interrupted, or "
                            "it was not written by this pipeline); use an earlier tag")
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{marker}: not a valid completion record ({exc})") from None
    for name, info in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise PipelineError(f"{path}: missing from the checkpoint (recorded in {marker})")
        if path.stat().st_size != info["bytes"]:
            raise PipelineError(f"{path}: {path.stat().st_size} bytes, but {info['bytes']} were written "
                                "(truncated or replaced); use an earlier tag")
    extra = sorted(name for name in _files(tag_dir) if name.endswith(".pt") and name not in files)
    if extra:
        raise PipelineError(f"{tag_dir / extra[0]}: not part of the checkpoint as saved (not in {marker}); "
                            "remove it")
    rank, world = share
    for name in sorted(files)[rank::world]:
        path = tag_dir / name
        if _describe(path)["sha256"] != files[name]["sha256"]:
            raise PipelineError(f"{path}: its sha256 differs from the one recorded when it was saved (the file is "
                                "corrupt or was changed); use an earlier tag")
        if scan and name.endswith(".pt"):
            safe_load(path, mmap=True)
    return record


def verify_on_all_ranks(tag_dir: Path, rank: int, world: int) -> dict[str, Any]:
    """`verify` (with the unpickling scan) split over the ranks; every rank raises the same
    error, so a bad file that only one rank would load cannot leave the others waiting."""
    import torch.distributed as dist

    try:
        record, problem = verify(tag_dir, share=(rank, world), scan=True), None
    except PipelineError as exc:
        record, problem = None, str(exc)
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise PipelineError(first)
    return record


# ---------------------------------------------------------------------- loading
def _deepspeed_globals() -> list[type]:
    """The non-tensor types DeepSpeed's checkpoint states hold (ZeRO 0-3, bf16/fp16): its ZeRO
    stage enum, the loss scalers, and the fragment addresses of the optimizer state."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | Path, map_location: Any = None, *, mmap: bool = False) -> Any:
    """`torch.load` that refuses anything but tensors, plain containers and DeepSpeed's
    state types: a crafted pickle is an error instead of running its payload."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "GLOBAL" in line),
                      str(exc).splitlines()[0] if str(exc) else "")
        raise PipelineError(f"{path}: refused to load: it holds objects other than tensors and DeepSpeed's "
                            f"checkpoint state ({detail}); a checkpoint written by this pipeline never does") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path}: not a readable checkpoint file ({exc})") from None


def _safe_checkpoint_engine(engine: Any) -> None:
    """Make the engine's checkpoint reads go through `safe_load` (DeepSpeed's own engine
    calls torch.load with weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise PipelineError(f"resume supports DeepSpeed's default checkpoint engine, not "
                            f"{type(engine.checkpoint_engine).__name__} (drop the checkpoint engine settings "
                            "from the DeepSpeed config)")
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)


def resume(engine: Any, ckpt_dir: Path, what: str | None, *, rank: int = 0, world: int = 1) -> int:
    """Load `what` into the engine: "auto" = the newest complete tag in `ckpt_dir` (newer
    incomplete ones are skipped, with a warning saying which and why), else a tag or a
    checkpoints directory. The step to continue from (0 when starting fresh)."""
    if not what:
        return 0
    if what == "auto":
        tag_dir, skipped = choose_auto(ckpt_dir)
        for tag, why in skipped:
            if rank == 0:
                log.warning("--resume auto: skipped %s (%s)", ckpt_dir / tag, why)
        if tag_dir is None:
            if rank == 0:
                log.info("no complete checkpoint in %s: starting from step 0", ckpt_dir)
            return 0
    else:
        tag_dir = resolve(what)
    verify_on_all_ranks(tag_dir, rank, world)
    _safe_checkpoint_engine(engine)
    try:
        loaded, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except PipelineError:
        raise
    except LOAD_ERRORS as exc:
        raise PipelineError(f"{tag_dir}: DeepSpeed could not load this checkpoint into the run "
                            f"({type(exc).__name__}: {exc}); was it saved with the same model, ZeRO stage "
                            "and number of ranks?") from None
    if loaded is None:
        raise PipelineError(f"could not load a checkpoint from {tag_dir}")
    if rank == 0:
        log.info("resumed from %s at step %d", tag_dir, client["step"])
    return int(client["step"])


def read_record(tag_dir: Path) -> dict[str, Any]:
    """A tag's task record. Tags written before task.json existed (config only) read as dual
    pretraining with no meta; their export still needs the data directory."""
    record_file, config_file = tag_dir / TASK_FILE, tag_dir / CONFIG_FILE
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{record_file}: not valid JSON ({exc})") from None
        if not (isinstance(record, dict) and isinstance(record.get("kind"), str)
                and isinstance(record.get("config"), dict)):
            raise PipelineError(f"{record_file}: expected an object with a task 'kind' and its 'config'")
        return record
    if config_file.is_file():
        return {"kind": "dual_pretraining", "config": json.loads(config_file.read_text()), "meta": {}}
    raise PipelineError(f"{tag_dir}: not a checkpoint written by launchers/pretrain.py (no {TASK_FILE})")
