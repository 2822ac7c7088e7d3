"""DeepSpeed checkpoint (any ZeRO stage) -> the DESIGN.md export directory.

The run's config is saved beside every checkpoint tag; the model is rebuilt
from it and the consolidated fp32 weights (DeepSpeed's own zero_to_fp32
reconstruction, which works for stages 0-3) are loaded strictly, so a missing or
extra tensor is an error rather than a silently re-initialised weight.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pipeline.config import from_dict
from pipeline.data.shards import load_manifest
from pipeline.dual import export_dual
from pipeline.errors import PipelineError
from pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)


def export_checkpoint(tag_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Export checkpoint tag directory `tag_dir` (e.g. runs/x/checkpoints/step100) to `out_dir`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.train.trainer import CONFIG_FILE, build_dual

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    config_file = tag_dir / CONFIG_FILE
    if not config_file.is_file():
        raise PipelineError(f"{tag_dir}: not a checkpoint written by launchers/pretrain.py (no {CONFIG_FILE})")
    cfg = from_dict(TrainConfig, json.loads(config_file.read_text()), where=str(config_file))
    manifest = load_manifest(cfg.data.path)
    dual = build_dual(cfg, manifest)
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    missing, unexpected = dual.load_state_dict(state, strict=False)
    # Tied weights appear once in the checkpoint. Frozen parameters are absent from ZeRO-1
    # checkpoints' optimizer shards; they never change, so the rebuild (from model.path or the
    # seeded init, exactly as at step 0) already holds them. Anything else missing is an error.
    tied = {n for n in missing if n.endswith("lm_head.weight")}
    frozen = {n for n, p in dual.named_parameters() if not p.requires_grad}
    lost = set(missing) - tied - frozen
    if lost or unexpected:
        raise PipelineError(f"{tag_dir}: checkpoint does not match the model "
                            f"(missing {sorted(lost)[:5]}, unexpected {unexpected[:5]})")
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    run_config = json.loads(config_file.read_text())
    run_config["data"]["path"] = str(Path(cfg.data.path).resolve())
    tokenizer = manifest.to_json().get("tokenizer", {})
    run_config["tokenizer"] = {**tokenizer, "path": _existing(tokenizer.get("path"), Path(cfg.data.path))}
    export_dual(dual, out_dir, run_config=run_config)
    log.info("exported %s -> %s", tag_dir, out_dir)
    return out_dir


def _existing(path: str | None, data_dir: Path) -> str | None:
    """The tokenizer path recorded by data-prep, made absolute where it can be found."""
    if not path:
        return None
    for candidate in (Path(path), data_dir / path):
        if candidate.exists():
            return str(candidate.resolve())
    return path
