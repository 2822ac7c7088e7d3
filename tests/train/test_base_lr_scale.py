"""train.base_lr_scale: the Base's parameters move at that fraction of the lr, under ZeRO-2.

h2 trains the Base and the Coprocessor together. Adam's update of a parameter whose gradient
keeps its sign is ~lr per step, so the largest change in each group after a few steps is ~the
sum of that group's learning rates: the Base's must be ~base_lr_scale times the Coprocessor's,
and equal to it at scale 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # conftest importable by the spawned ranks

from pipeline.train.testing import run_distributed  # noqa: E402

STEPS = 4


def _max_updates(out: Path, data: Path, scale: float) -> dict[str, float]:
    from conftest import cpu_ds_config

    from pipeline.train.config import load_config
    from pipeline.train.dual_task import DualPretraining
    from pipeline.train.trainer import train

    cfg = load_config("tiny-h2", [f"data.path={data}", f"train.output_dir={out}", f"train.max_steps={STEPS}",
                                  "tracking.enabled=false", "train.export=false", f"train.base_lr_scale={scale}"])
    task = DualPretraining(cfg)
    captured = {}
    original = task.build

    def build(layout):
        model = original(layout)
        captured.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    task.build = build
    ds = cpu_ds_config()
    ds["optimizer"]["params"]["weight_decay"] = 0.0
    ds["scheduler"]["params"]["warmup_num_steps"] = 1
    res = train(task, ds)
    after = dict(res.model.named_parameters())
    groups: dict[str, float] = {}
    for name, before in captured.items():
        group = name.split(".")[0]
        groups[group] = max(groups.get(group, 0.0), float((after[name].detach() - before).abs().max()))
    lrs = [g["lr"] for g in res.engine.optimizer.param_groups]
    return {**groups, "group_lrs": sorted(lrs)}


@pytest.fixture(scope="module")
def updates(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("base_lr")
    return {scale: run_distributed(_max_updates, root / str(scale), corpus_dir, scale, world_size=2)[0]
            for scale in (1.0, 0.1)}


def test_the_base_moves_at_its_scale_of_the_lr(updates):
    full, scaled = updates[1.0], updates[0.1]
    assert 0.7 < full["base"] / full["coprocessor"] < 1.4
    assert 0.05 < scaled["base"] / scaled["coprocessor"] < 0.15
    assert scaled["coprocessor"] == pytest.approx(full["coprocessor"], rel=0.3)
    lo, hi = scaled["group_lrs"]
    assert lo == pytest.approx(0.1 * hi)


def test_a_task_without_a_base_refuses_the_scale():
    from pipeline.errors import PipelineError
    from pipeline.train.configs import load_task_config
    from pipeline.train.task import get_task

    kind, cfg = load_task_config("ltm-tiny", ["train.base_lr_scale=0.5"])
    with pytest.raises(PipelineError, match="base_lr_scale applies to dual pretraining"):
        get_task(kind)(cfg).param_groups(None)


def test_a_scheduler_that_sets_one_lr_for_all_groups_is_refused():
    from pipeline.errors import PipelineError
    from pipeline.train.trainer import optimizer_groups

    groups = [{"params": ["a"], "lr_scale": 0.1}, {"params": ["b"], "lr_scale": 1.0}]
    ds = {"optimizer": {"params": {"lr": 1e-3}}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(PipelineError, match="WarmupCosineLR"):
        optimizer_groups(groups, ds)
    ds["scheduler"]["type"] = "WarmupCosineLR"
    assert [g["lr"] for g in optimizer_groups(groups, ds)] == pytest.approx([1e-4, 1e-3])
    assert optimizer_groups([{"params": ["a", "b"], "lr_scale": 1.0}], ds) == ["a", "b"]
