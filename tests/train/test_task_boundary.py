"""The loop knows no model kind: a toy task defined here trains through it.

A toy regression task (not a dual model) runs under ZeRO-2 on 2 gloo ranks: it
checkpoints, resumes exactly and exports through `pipeline.train`, which proves
the task boundary. The same toy pins gradient accumulation (2 x 2 micro-batches
== 1 x 4) and the NaN policy `skip` (step count, learning rate and checkpoint tags
stay in phase with DeepSpeed's own counters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # conftest importable by the spawned ranks

from pipeline.config import from_dict  # noqa: E402
from pipeline.train.config import TrackingSection, TrainSection  # noqa: E402
from pipeline.train.task import BatchLayout, StepOutput, Task, register_task  # noqa: E402
from pipeline.train.testing import run_distributed  # noqa: E402

DIM = 8


@dataclasses.dataclass
class ToyConfig:
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    tracking: TrackingSection = dataclasses.field(default_factory=lambda: TrackingSection(enabled=False))
    seed: int = 0
    nan_at: list[list[int]] = dataclasses.field(default_factory=list)
    """(step, micro_step) pairs whose loss is made NaN."""


@register_task
class ToyRegression(Task):
    """Fit y = W* x + noise with a linear layer; sample i of the stream is a function of (seed, i)."""

    kind = "toy_regression"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        self.config = config

    def build(self, layout: BatchLayout) -> nn.Module:
        self.layout = layout
        torch.manual_seed(self.config.seed)
        return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM))

    def _sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.config.seed * 100_003 + i)
        x = torch.randn(DIM, generator=g)
        return x, torch.roll(x, 1) * 0.5 + 0.1 * torch.randn(DIM, generator=g)

    def batch(self, step: int, micro_step: int) -> dict[str, Any]:
        lay = self.layout
        first = step * lay.global_batch + (micro_step * lay.world + lay.rank) * lay.micro_batch
        xs, ys = zip(*(self._sample(first + j) for j in range(lay.micro_batch)), strict=True)
        return {"x": torch.stack(xs), "y": torch.stack(ys), "nan": [step, micro_step] in self.config.nan_at}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        err = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        if batch["nan"]:
            err = err * float("nan")
        return StepOutput(loss=err, metrics={"abs_err": err.detach().sqrt()})

    def flops(self, batch: dict[str, Any]) -> float:
        return 6.0 * (DIM * 16 * 2) * batch["x"].shape[0]

    def tokens(self, batch: dict[str, Any]) -> int:
        return batch["x"].shape[0]

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        xs, ys = zip(*(self._sample(-1 - j) for j in range(16)), strict=True)
        return {"val_loss": float(((model(torch.stack(xs)) - torch.stack(ys)) ** 2).mean())}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"dim": DIM}

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], meta: dict[str, Any], *, where: str) -> ToyRegression:
        assert meta == {"dim": DIM}
        return cls(from_dict(ToyConfig, config, where=where))

    def export(self, state: dict[str, torch.Tensor], out_dir: Path, *, where: str) -> None:
        out_dir.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))


def _ds(micro: int, accum: int) -> dict:
    from conftest import cpu_ds_config

    ds = cpu_ds_config("zero2_cpu", train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    ds["optimizer"]["params"]["lr"] = 1e-2
    return ds


def _cfg(out: Path, **train: Any) -> ToyConfig:
    return ToyConfig(train=TrainSection(output_dir=str(out), eval_every=0, **{"max_steps": 6, **train}))


def _metrics(run: Path) -> list[dict]:
    """The per-step rows of metrics.jsonl (the final validation row has no `lr`)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "lr" in row]


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def fresh_layout() -> BatchLayout:
    return BatchLayout(micro_batch=2, accumulation=1, world=1, rank=0, device=torch.device("cpu"))


def toy_checks(out: Path) -> dict:
    """Every toy run, on each of 2 ranks; returns plain data."""
    from pipeline.train.trainer import train

    r: dict[str, Any] = {}
    # boundary: train, checkpoint, export; exact resume
    res = train(ToyRegression(_cfg(out / "straight")), _ds(2, 1))
    fresh = ToyRegression(_cfg(out / "unused"))
    untrained = fresh.validate(fresh.build(fresh_layout()))["val_loss"]
    r["straight"] = {"finished": res.finished, "untrained_val": untrained, "export": str(res.export_dir), "weights": _weights(res.model),
                     "losses": [m["loss"] for m in _metrics(out / "straight")], "val": res.val_loss,
                     "global_steps": res.engine.global_steps}
    split = ToyRegression(_cfg(out / "split", stop_after_steps=3))
    first = train(split, _ds(2, 1), resume="auto")
    second = train(split, _ds(2, 1), resume="auto")
    r["split"] = {"first": (first.step, first.finished), "second": (second.step, second.finished),
                  "losses": [m["loss"] for m in _metrics(out / "split")], "weights": _weights(second.model)}
    # accumulation: 2 micro-batches of 2 per step == 1 of 4 (same samples: the stream is cut by position)
    for name, (micro, accum) in {"2x2": (2, 2), "1x4": (4, 1)}.items():
        res = train(ToyRegression(_cfg(out / name)), _ds(micro, accum))
        r[name] = {"losses": [m["loss"] for m in _metrics(out / name)], "weights": _weights(res.model),
                   "global_steps": res.engine.global_steps}
    # NaN skip: one micro-batch of step 2 (of 2), and the whole of step 4, dropped
    ref = train(ToyRegression(_cfg(out / "nan_ref")), _ds(2, 2))
    nan_cfg = _cfg(out / "nan", nan_policy="skip", checkpoint_every=1)
    nan_cfg.nan_at = [[2, 1], [4, 0], [4, 1]]
    res = train(ToyRegression(nan_cfg), _ds(2, 2))
    r["nan"] = {"metrics": _metrics(out / "nan"), "ref_metrics": _metrics(out / "nan_ref"), "step": res.step,
                "global_steps": res.engine.global_steps, "ref_weights": _weights(ref.model),
                "weights": _weights(res.model), "tags": sorted(p.name for p in (out / "nan" / "checkpoints").glob("step*")),
                "latest": (out / "nan" / "checkpoints" / "latest").read_text().strip()}
    return r


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return run_distributed(toy_checks, out, world_size=2), out


def test_a_task_that_is_not_a_dual_model_trains_checkpoints_and_exports(toy):
    (r0, r1), out = toy
    s = r0["straight"]
    assert s["finished"] and s["global_steps"] == 6 and len(s["losses"]) == 6
    assert math.isfinite(s["val"]) and s["val"] < 0.9 * s["untrained_val"]
    exported = load_file(Path(s["export"]) / "model.safetensors")
    for name, w in s["weights"].items():  # the export is the trained model (ZeRO-2 consolidated)
        np.testing.assert_array_equal(exported[name].numpy(), w)
    for name, w in r1["straight"]["weights"].items():  # ranks hold the same replica
        np.testing.assert_array_equal(s["weights"][name], w)
    record = json.loads((out / "straight" / "checkpoints" / "step6" / "task.json").read_text())
    assert record["kind"] == "toy_regression" and record["meta"] == {"dim": DIM}


def test_toy_task_resumes_exactly(toy):
    r = toy[0][0]
    assert r["split"]["first"] == (3, False) and r["split"]["second"] == (6, True)
    assert r["split"]["losses"] == r["straight"]["losses"]
    for name, w in r["straight"]["weights"].items():
        np.testing.assert_array_equal(r["split"]["weights"][name], w)


def test_accumulation_equals_the_larger_micro_batch(toy):
    r = toy[0][0]
    assert r["2x2"]["global_steps"] == r["1x4"]["global_steps"] == 6
    np.testing.assert_allclose(r["2x2"]["losses"], r["1x4"]["losses"], rtol=1e-5)
    for name, w in r["1x4"]["weights"].items():
        np.testing.assert_allclose(r["2x2"]["weights"][name], w, rtol=1e-4, atol=1e-6)


def test_nan_skip_keeps_step_lr_and_tags_in_phase(toy):
    n = toy[0][0]["nan"]
    steps = [m["step"] for m in n["metrics"]]
    assert steps == list(range(1, 7)) and n["step"] == 6 and n["global_steps"] == 6
    assert n["tags"] == [f"step{i}" for i in range(1, 7)] and n["latest"] == "step6"
    # the schedule is a function of the step, skipped or not
    assert [m["lr"] for m in n["metrics"]] == [m["lr"] for m in n["ref_metrics"]]
    assert [m["skipped_batches"] for m in n["metrics"]] == [0, 0, 1, 1, 3, 3]
    # before the first drop the runs are identical; after it they differ, but stay finite
    assert [m["loss"] for m in n["metrics"][:2]] == [m["loss"] for m in n["ref_metrics"][:2]]
    assert "loss" not in n["metrics"][4]  # step 5 (index 4) had no micro-batch left to average
    assert all(np.isfinite(w).all() for w in n["weights"].values())
    assert any(not np.array_equal(n["weights"][k], w) for k, w in n["ref_weights"].items())


def test_an_all_dropped_step_moves_no_weight(toy):
    """Step 5 (index 4) dropped both micro-batches: the step4 and step5 checkpoints hold equal weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = toy[1] / "nan" / "checkpoints"
    before = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step4")
    after = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step5")
    later = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step6")
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert any(not torch.equal(later[k], before[k]) for k in before)  # training goes on after it
