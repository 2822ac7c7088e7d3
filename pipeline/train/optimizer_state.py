"""Clearing an optimizer's moments in place, under any DeepSpeed ZeRO stage.

    n = reset_optimizer_moments(engine)    # from a task's before_step, e.g. at a curriculum stage change

Coconut starts a new AdamW at every curriculum stage. With DeepSpeed the optimizer is
built once by `deepspeed.initialize`, and under ZeRO-1/2/3 `engine.optimizer` is a
wrapper whose torch optimizer (`.optimizer`) steps the flat fp32 partitions this rank
owns; its `state` is where the moments live. Zeroing every tensor of that state and
setting the step counts to 0 is what a fresh AdamW would start from (its first update
after the reset uses bias correction for step 1), and it keeps the state's structure,
so checkpoints save and resume as before. Learning rate and scheduler are left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import PipelineError


def torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under a DeepSpeed engine (or under ZeRO wrappers, or itself)."""
    opt = getattr(engine, "optimizer", engine)
    for _ in range(4):  # engine -> ZeRO / fp16 wrapper -> torch optimizer
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise PipelineError("no torch optimizer found under the DeepSpeed engine; cannot reset its moments")


@torch.no_grad()
def reset_optimizer_moments(engine: Any) -> int:
    """Zero every state tensor (moments, step counters) of the engine's optimizer on this
    rank; returns how many parameter states were reset."""
    opt = torch_optimizer(engine)
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, int | float):
                state[key] = type(value)(0)
    return len(opt.state)
