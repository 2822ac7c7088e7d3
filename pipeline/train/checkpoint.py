"""Checkpoints of the loop: DeepSpeed's state per tag, plus what makes a tag self-contained.

    checkpoints/
      latest                      DeepSpeed's pointer to the newest tag
      step100/
        mp_rank_00_model_states.pt, *_optim_states.pt      DeepSpeed (any ZeRO stage)
        task.json                 {"kind", "step", "config", "meta"}: rebuilds the task anywhere
        pipeline_config.json      the task's config alone, for people

`task.json` is what export reads: the task kind, its resolved config and the
task's `checkpoint_meta()` (data identity, the hash of frozen weights it starts
from), so a checkpoint exports with the data directory gone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.train.task import Task

log = logging.getLogger(__name__)
TASK_FILE = "task.json"
CONFIG_FILE = "pipeline_config.json"


def save(engine: Any, ckpt_dir: Path, step: int, task: Task, meta: dict[str, Any] | None, rank: int) -> Path:
    """DeepSpeed's checkpoint `step{step}` on every rank; the task record from rank 0."""
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    if rank == 0:
        record = {"kind": task.kind, "step": step, "config": task.config_dict(), "meta": meta or {}}
        (ckpt_dir / tag / TASK_FILE).write_text(json.dumps(record, indent=2))
        (ckpt_dir / tag / CONFIG_FILE).write_text(json.dumps(record["config"], indent=2))
    return ckpt_dir / tag


def resume(engine: Any, ckpt_dir: Path, what: str | None) -> int:
    """Load `what` ("auto" = the newest tag in `ckpt_dir` if any, else a tag or checkpoints
    path) into the engine; the step to continue from (0 when starting fresh)."""
    if not what:
        return 0
    if what == "auto":
        if not (ckpt_dir / "latest").is_file():
            log.info("no checkpoint in %s: starting from step 0", ckpt_dir)
            return 0
        load_dir, tag = ckpt_dir, None
    else:
        path = Path(what)
        load_dir, tag = (path, None) if (path / "latest").is_file() else (path.parent, path.name)
        if not (load_dir / (tag or "")).exists():
            raise PipelineError(f"--resume {what}: no DeepSpeed checkpoint there")
    loaded, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if loaded is None:
        raise PipelineError(f"could not load a checkpoint from {load_dir} (tag {tag or 'latest'})")
    log.info("resumed from %s at step %d", loaded, client["step"])
    return int(client["step"])


def read_record(tag_dir: Path) -> dict[str, Any]:
    """A tag's task record. Tags written before task.json existed (config only) read as dual
    pretraining with no meta; their export still needs the data directory."""
    record_file, config_file = tag_dir / TASK_FILE, tag_dir / CONFIG_FILE
    if record_file.is_file():
        try:
            return json.loads(record_file.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{record_file}: not valid JSON ({exc})") from None
    if config_file.is_file():
        return {"kind": "dual_pretraining", "config": json.loads(config_file.read_text()), "meta": {}}
    raise PipelineError(f"{tag_dir}: not a checkpoint written by launchers/pretrain.py (no {TASK_FILE})")
