"""DeepSpeed checkpoint (any ZeRO stage) -> the task's export directory.

The checkpoint tag carries its task record (`checkpoint.TASK_FILE`: kind, resolved
config, and the task's meta); the task is rebuilt from it, the consolidated fp32
weights are reconstructed by DeepSpeed's own zero_to_fp32 (stages 0-3), and the
task writes its export. Nothing outside the checkpoint is read except what the
task recorded and verifies (for a dual run started from a Base directory: that
directory, checked against its recorded hash).

The tag must be complete, with every file's recorded size and checksum, and every
`.pt` file must unpickle with `weights_only=True` before zero_to_fp32 (which loads
with weights_only=False) reads it. The export is written beside `out_dir` and moved
into place at the end, with `export.json` (where it came from) marking it as an
export: only such a directory is ever replaced.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.ltm import task as ltm_task  # noqa: F401 - registers the built-in task kind ltm
from pipeline.tasks import coconut, finetune, latent  # noqa: F401 - register the task kinds coconut, reasoning_sft, latent_sft
from pipeline.train import checkpoint, dual_task  # noqa: F401 - registers the built-in task kind
from pipeline.train.task import get_task

log = logging.getLogger(__name__)
EXPORT_FILE = "export.json"
"""Written into every export: the checkpoint it came from. Marks a directory as an export."""


def is_export(directory: Path) -> bool:
    """A directory this pipeline exported (`export.json`; exports written before it existed
    have the DESIGN.md `pipeline.json`)."""
    return (directory / EXPORT_FILE).is_file() or (directory / "pipeline.json").is_file()


def check_output(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an output directory that holds anything but a previous export (with or without
    --overwrite), and a previous export without --overwrite."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PipelineError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not is_export(out_dir):
        raise PipelineError(f"{out_dir}: a non-empty directory that is not an export (no {EXPORT_FILE} or "
                            "pipeline.json); refusing to write into or replace it, even with --overwrite")
    if not overwrite:
        raise PipelineError(f"{out_dir}: already holds an export; pass --overwrite to replace it")


def export_checkpoint(tag_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Export checkpoint tag directory `tag_dir` (e.g. runs/x/checkpoints/step100) to `out_dir`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    check_output(out_dir, overwrite=overwrite)
    record = checkpoint.read_record(tag_dir)
    complete = checkpoint.verify(tag_dir, scan=True)
    where = str(tag_dir)
    task = get_task(record["kind"]).from_checkpoint(record["config"], record.get("meta") or {}, where=where)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except checkpoint.LOAD_ERRORS as exc:
        raise PipelineError(f"{tag_dir}: DeepSpeed's zero_to_fp32 could not read this checkpoint "
                            f"({type(exc).__name__}: {exc})") from None
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # a previous export killed half-way
    task.export(state, staging, where=where)
    (staging / EXPORT_FILE).write_text(json.dumps({"checkpoint": str(tag_dir.resolve()), "kind": record["kind"],
                                                   "step": complete.get("step")}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)  # check_output allowed only an empty directory or a previous export
    staging.rename(out_dir)
    log.info("exported %s -> %s", tag_dir, out_dir)
    return out_dir
