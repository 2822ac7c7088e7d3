"""`TrainConfig`: the pipeline config of one training run (DeepSpeed owns the rest).

The pipeline config owns model, variant, data, loop and tracking; the DeepSpeed
config (`ds_configs/*.json`) owns batch size, optimizer, scheduler, precision and
ZeRO stage. Presets are YAML files in `pipeline/presets/` (or any path), with
dotted command-line overrides on top; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import apply_overrides, check, from_dict
from pipeline.dual.config import DualConfig
from pipeline.errors import PipelineError
from pipeline.models.config import ModelConfig, preset

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


@dataclasses.dataclass
class ModelSection:
    preset: str = "gpt2-tiny"
    """Model preset (pipeline.models.PRESETS) for a fresh random Base; ignored with `path`."""
    path: str = ""
    """A Hugging Face directory, or an export directory (its base/), to start the Base from."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """ModelConfig fields to change in the preset (vocab_size defaults to the data's)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""

    def __post_init__(self) -> None:
        """Checked here, at config load: before any process group or DeepSpeed start, and
        under `--dry-run`, a wrong key names itself instead of failing deep in a build."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise PipelineError(f"model.overrides.{unknown[0]}: not a model config field; known fields: "
                                f"{', '.join(sorted(known))}")
        if self.path and self.overrides:
            raise PipelineError(f"model.overrides ({', '.join(sorted(self.overrides))}) change a preset, but "
                                f"model.path={self.path} loads a checkpoint whose config.json decides; drop one")
        if not self.path:
            try:
                preset(self.preset, **self.overrides)  # the preset exists and the changed config is valid
            except PipelineError as exc:
                raise PipelineError(f"model: {exc}") from None


@dataclasses.dataclass
class DataSection:
    path: str = ""
    """A data-prep output directory (manifest.json + shards)."""
    seq_len: int = 128
    """S: tokens per packed training sequence."""
    seed: int = 1234
    """Seeds the sequence order, the site draws and a fresh model's init."""
    verify: bool = False
    """Before training, re-hash every shard against the manifest (a flipped byte is found; costs
    a full read of the data). Without it the start-up check is cheap: the manifest is complete,
    every shard's sizes and index agree with it."""

    def __post_init__(self) -> None:
        check([f"data.seq_len={self.seq_len}: must be >= 2 (a sequence predicts its next tokens)"]
              if self.seq_len < 2 else [])


@dataclasses.dataclass
class TrainSection:
    max_steps: int = 100
    """Optimizer steps of the run (also the scheduler's total_num_steps)."""
    output_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl and the export go here."""
    log_every: int = 10
    """Debug-log a step line, and send the buffered steps to MLflow, every this many steps
    (every step goes to metrics.jsonl and the launcher's progress display, and every step's
    values reach MLflow: in batches, also at each validation and checkpoint and every 30 s)."""
    eval_every: int = 50
    """Validation loss every this many steps (0 = only at the end)."""
    eval_sequences: int = 16
    """Validation sequences per evaluation."""
    checkpoint_every: int = 0
    """Save a DeepSpeed checkpoint every this many steps (0 = at the end and on SIGTERM/SIGINT)."""
    stop_after_steps: int = 0
    """Checkpoint and stop after this many steps of this invocation (time-boxed jobs; 0 = off)."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """A non-finite loss: stop with an error (no checkpoint), or skip that batch and count it."""
    export: bool = True
    """Write the DESIGN.md export directory (output_dir/export) when the run finishes."""
    base_lr_scale: float = 1.0
    """Learning-rate multiplier for the pretrained Base's parameters, where the task trains
    them (continued_pretraining, h2, soft_embedding); what the task adds (Coprocessor, soft
    tokens, latent code) trains at the DeepSpeed config's lr. 0.1 continues the Base at the
    lr a warmup-cosine run with cos_min_ratio 0.1 ended at, instead of re-warming it to the
    peak (which the issue-13 probe measured damaging a small Base). Needs WarmupCosineLR
    (it scales each parameter group's own lr) or no scheduler."""

    def __post_init__(self) -> None:
        """Every field a loop divides by or counts with, checked at load (and under --dry-run):
        before, max_steps=0 "finished" having trained nothing, log_every=0 divided by zero,
        eval_sequences=0 logged a validation loss of 0.0, checkpoint_every=-1 saved every step."""
        at_least = {"max_steps": 1, "log_every": 1, "eval_sequences": 1,
                    "eval_every": 0, "checkpoint_every": 0, "stop_after_steps": 0}
        check([f"train.{name}={getattr(self, name)}: must be >= {low}" + (" (0 = off)" if low == 0 else "")
               for name, low in at_least.items() if getattr(self, name) < low]
              + ([f"train.base_lr_scale={self.base_lr_scale}: must be > 0"] if not self.base_lr_scale > 0 else []))


@dataclasses.dataclass
class TrackingSection:
    enabled: bool = True
    """Log to MLflow from rank 0."""
    tracking_uri: str = ""
    """MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else a sqlite store in output_dir."""
    experiment: str = "latent-pipeline"
    run_name: str = ""
    parent_run_id: str = ""
    """Make this run a child of that MLflow run (a recipe's parent run groups its stages)."""


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    dual: DualConfig = dataclasses.field(default_factory=DualConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    tracking: TrackingSection = dataclasses.field(default_factory=TrackingSection)

    def __post_init__(self) -> None:
        # The Base's positions are known now: from its preset, or from model.path's config.json
        # (a path that is not there yet is reported when the run loads it).
        where, positions = f"model preset {self.model.preset}", None
        if not self.model.path:
            positions = preset(self.model.preset, **self.model.overrides).max_position_embeddings
        else:
            path = Path(self.model.path)
            path = path / "base" if (path / "base" / "config.json").is_file() else path  # an export: its Base
            if (path / "config.json").is_file():
                from pipeline.models.hf import read_config

                where, positions = str(path), read_config(path).max_position_embeddings
        check([f"data.seq_len={self.data.seq_len} exceeds the max_position_embeddings={positions} of {where}; "
               "lower data.seq_len" + ("" if self.model.path else " or set model.overrides.max_position_embeddings")]
              if positions is not None and self.data.seq_len > positions else [])


def preset_path(name_or_path: str) -> Path:
    """A preset name (`tiny-liu`) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise PipelineError(f"no preset or YAML file {name_or_path!r}; presets: {known}")


def read_yaml(path: Path) -> dict[str, Any]:
    """A preset file's config tree (a mapping), or a clear error."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of config sections")
    return raw


def load_config(name_or_path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Preset (or YAML file) + dotted overrides -> a validated `TrainConfig`."""
    raw = read_yaml(preset_path(name_or_path)) if name_or_path else {}
    return from_dict(TrainConfig, apply_overrides(raw, list(overrides)))
