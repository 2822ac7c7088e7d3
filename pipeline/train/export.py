"""DeepSpeed checkpoint (any ZeRO stage) -> the task's export directory.

The checkpoint tag carries its task record (`checkpoint.TASK_FILE`: kind, resolved
config, and the task's meta); the task is rebuilt from it, the consolidated fp32
weights are reconstructed by DeepSpeed's own zero_to_fp32 (stages 0-3), and the
task writes its export. Nothing outside the checkpoint is read except what the
task recorded and verifies (for a dual run started from a Base directory: that
directory, checked against its recorded hash).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.ltm import task as ltm_task  # noqa: F401 - registers the built-in task kind ltm
from pipeline.tasks import finetune  # noqa: F401 - registers the built-in task kind reasoning_sft
from pipeline.train import dual_task  # noqa: F401 - registers the built-in task kind
from pipeline.train.checkpoint import read_record
from pipeline.train.task import get_task

log = logging.getLogger(__name__)


def export_checkpoint(tag_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Export checkpoint tag directory `tag_dir` (e.g. runs/x/checkpoints/step100) to `out_dir`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    record = read_record(tag_dir)
    where = str(tag_dir)
    task = get_task(record["kind"]).from_checkpoint(record["config"], record.get("meta") or {}, where=where)
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    task.export(state, out_dir, where=where)
    log.info("exported %s -> %s", tag_dir, out_dir)
    return out_dir
