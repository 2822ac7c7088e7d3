"""The line between the training loop and what it trains.

The loop (`pipeline.train.trainer.train`) owns everything a model kind should not
have to repeat: the DeepSpeed engine, the data position (a step number),
checkpoints and exact resume, SIGTERM, the NaN policy, MLflow, the validation
cadence and the call to export. A *task* owns the rest:

    task.build(layout)          -> nn.Module    its modules, seeded; requires_grad says what trains
    task.batch(step, micro)     -> batch        a pure function of (seed, step, micro, rank)
    task.loss(model, batch)     -> StepOutput   loss + metrics (may run an inner optimisation loop)
    task.flops(batch)           -> float        model FLOPs of that micro-batch's forward + backward
    task.validate(model)        -> {"val_loss": ...}
    task.export(state, out_dir)                 from a consolidated fp32 state dict

Dual-model pretraining (`pipeline.train.dual_task`) is the first task. A curriculum
fine-tuning task (examples instead of packed shards; `before_step` can reset the
optimizer at a stage boundary) and an LTM task (`loss` runs the per-sequence inner
loop on its own tensors, then returns the ELBO for the decoder) fit the same shape.

Export runs from a checkpoint, possibly on another machine, so a task records in
`checkpoint_meta()` everything it needs beyond its config (data identity, the
hash of frozen weights it starts from) and is rebuilt by `from_checkpoint`. Task
kinds register themselves by name (`@register_task`); the checkpoint names its kind.

Compared with OLMo-core's `TrainModule` (which also owns the optimizer and the
parallelism) a task is smaller: DeepSpeed owns those here, configured by JSON.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipeline.config import to_dict
from pipeline.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is cut: micro-batches x accumulation x ranks."""

    micro_batch: int
    accumulation: int
    world: int
    rank: int
    device: torch.device

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world


@dataclasses.dataclass
class StepOutput:
    """One micro-batch's objective and what to log about it."""

    loss: Tensor
    """The scalar the loop back-propagates (mean over the micro-batch)."""
    metrics: dict[str, Tensor | float] = dataclasses.field(default_factory=dict)
    """Scalars averaged over micro-batches and ranks, logged beside `loss`."""


class Task(abc.ABC):
    """One model kind's side of training. Subclasses set `kind` and `config`."""

    kind: ClassVar[str]
    """The registry name recorded in checkpoints (`TASKS[kind]` rebuilds the task)."""
    config_class: ClassVar[type]
    """The config dataclass a preset of this kind loads into (the `task:` key names the kind)."""
    config: Any
    """A `config_class` instance, with at least `train` (TrainSection) and `tracking` (TrackingSection)."""

    @abc.abstractmethod
    def build(self, layout: BatchLayout) -> nn.Module:
        """The modules to train, seeded, on `layout.device`; parameters with requires_grad train."""

    @abc.abstractmethod
    def batch(self, step: int, micro_step: int) -> Any:
        """Micro-batch `micro_step` of optimizer step `step` for this rank: a pure function of
        (seed, step, micro_step, rank), so resuming needs nothing but the step."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> StepOutput:
        """Forward `batch` through `model` (the DeepSpeed engine wrapping `build()`'s module)."""

    @abc.abstractmethod
    def flops(self, batch: Any) -> float:
        """Model FLOPs (`pipeline.flops` convention) of this micro-batch's forward + backward."""

    @abc.abstractmethod
    def tokens(self, batch: Any) -> int:
        """Tokens this micro-batch trains on (for tokens/s)."""

    @abc.abstractmethod
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, the same on every rank; must include `val_loss`."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups, each `{"params": [...], "lr_scale": s}`
        (s multiplies the DeepSpeed config's lr). One group at scale 1 unless a task splits them."""
        if getattr(self.config.train, "base_lr_scale", 1.0) != 1.0:
            raise PipelineError(f"train.base_lr_scale applies to dual pretraining; task {self.kind!r} has no "
                                "separate Base to scale (leave it at 1)")
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def before_step(self, step: int, engine: Any) -> None:  # noqa: B027 - an optional hook
        """Called on every rank before optimizer step `step` (e.g. a curriculum stage change)."""

    def provenance(self) -> dict[str, Any]:
        """Extra run parameters for MLflow (data manifest, ...)."""
        return {}

    def artifacts(self) -> list[Path]:
        """Files to attach to the MLflow run at start."""
        return []

    def config_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON data (written beside every checkpoint)."""
        return to_dict(self.config)

    @abc.abstractmethod
    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON data that export needs beyond the config; computed on rank 0."""

    @classmethod
    @abc.abstractmethod
    def from_checkpoint(cls, config: dict[str, Any], meta: dict[str, Any], *, where: str) -> Task:
        """The task of a checkpoint, from its recorded config and meta (no data directory needed)."""

    @abc.abstractmethod
    def export(self, state: dict[str, Tensor], out_dir: Path, *, where: str) -> None:
        """Write the export directory from the checkpoint's consolidated fp32 state dict."""


def load_checked(module: nn.Module, state: dict[str, Tensor], what: str, *, tied: bool) -> None:
    """`module.load_state_dict(state)` that accepts only a missing tied head (`*lm_head.weight`
    when `tied`) and otherwise names what is missing or unexpected: a checkpoint or export that
    does not match its recorded config is an error, never a partly random model."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    lost = [n for n in missing if not (tied and n.endswith("lm_head.weight"))]
    if lost or unexpected:
        raise PipelineError(f"{what} does not match the model (missing {sorted(lost)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})")


def require_meta(meta: dict[str, Any], keys: set[str], where: str) -> None:
    """A checkpoint's task.json meta must hold `keys` (what export rebuilds the model from)."""
    missing = keys - set(meta)
    if missing:
        raise PipelineError(f"{where}: task.json meta lacks {', '.join(sorted(missing))}")


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task kind rebuildable from its checkpoints."""
    if TASKS.get(cls.kind, cls) is not cls:
        raise PipelineError(f"task kind {cls.kind!r} is registered twice ({TASKS[cls.kind]} and {cls})")
    TASKS[cls.kind] = cls
    return cls


def get_task(kind: str) -> type[Task]:
    try:
        return TASKS[kind]
    except KeyError:
        raise PipelineError(f"unknown task kind {kind!r} (known: {', '.join(sorted(TASKS)) or 'none'}); "
                            "import the module that defines it before exporting") from None
