"""Which task a preset trains: its top-level `task:` key picks the config class and the task.

    task = load_task("reason-prosqa-cot", ["train.max_steps=10"])   # a ReasoningSFT
    task = load_task("tiny-liu", ["data.path=runs/data"])           # no `task:` key: DualPretraining
    kind, cfg = load_task_config("reason-prosqa-cot")                # the validated config alone

A preset without `task:` is dual pretraining (`pipeline.train.config.TrainConfig`), so every
existing preset and `load_config` keep working. A new training task enters by being
registered (`pipeline.train.task.register_task`) with its `kind` and `config_class`, and
imported here.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import apply_overrides, from_dict
from pipeline.errors import PipelineError
from pipeline.ltm import task as ltm_task  # noqa: F401 - registers ltm
from pipeline.tasks import coconut, finetune, latent  # noqa: F401 - register coconut, reasoning_sft, latent_sft
from pipeline.train.config import preset_path, read_yaml
from pipeline.train.dual_task import DualPretraining
from pipeline.train.task import TASKS, Task

DEFAULT_KIND = DualPretraining.kind
KINDS: dict[str, tuple[type, type[Task]]] = {kind: (cls.config_class, cls) for kind, cls in TASKS.items()
                                              if hasattr(cls, "config_class")}
"""Task kind -> (its config dataclass, its Task class), from the task registry."""


def read_preset(name_or_path: str, overrides: list[str] = ()) -> tuple[str, dict[str, Any]]:
    """(task kind, the raw config tree with overrides applied and the `task` key removed)."""
    path = preset_path(name_or_path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    kind = raw.pop("task", DEFAULT_KIND)
    if kind not in KINDS:
        raise PipelineError(f"{path}: task: {kind!r} is not a training task; known: {', '.join(sorted(KINDS))}")
    return kind, raw


def load_task_config(name_or_path: str, overrides: list[str] = ()) -> tuple[str, Any]:
    """(task kind, its validated config) of a preset name or YAML path plus dotted overrides."""
    kind, raw = read_preset(name_or_path, overrides)
    return kind, from_dict(KINDS[kind][0], raw)


def load_task(name_or_path: str, overrides: list[str] = ()) -> Task:
    """The task a preset describes, built from its validated config (nothing loaded or started yet)."""
    kind, cfg = load_task_config(name_or_path, overrides)
    return KINDS[kind][1](cfg)
