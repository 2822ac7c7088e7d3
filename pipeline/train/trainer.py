"""The DeepSpeed training loop, generic over tasks (`pipeline.train.task`).

    result = train(DualPretraining(cfg), json.load(open("ds_configs/zero2_cpu.json")), resume="auto")
    result.export_dir, result.step, result.val_loss, result.model

The loop owns the engine, the data position (the step: a task's batches are pure
functions of it), checkpoints and exact resume, SIGTERM, the NaN policy,
tracking, the validation cadence and the export call. Everything DeepSpeed-specific
lives here and in `checkpoint.py`; models know nothing about it.

Gradient accumulation is DeepSpeed's: `engine.backward` scales each micro-batch's
loss by 1/accumulation and `engine.step()` on every micro-batch updates only at the
boundary, so the loop's step, DeepSpeed's `global_steps`, the scheduler and the
checkpoint tag move together. `nan_policy=skip` keeps them together too: a
micro-batch whose loss is non-finite on any rank is replaced by a zero loss over
the trainable parameters (every rank still runs its backward and its `step`, so
collectives and the accumulation counter stay in phase); if every micro-batch of a
step was dropped, that step is taken at learning rate 0, so no weight moves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.flops import mfu, peak_tflops
from pipeline.train import checkpoint
from pipeline.train.export import export_checkpoint
from pipeline.train.task import BatchLayout, Task
from pipeline.train.tracking import Tracker, plot_metrics

log = logging.getLogger(__name__)
StepCallback = Callable[[int, dict[str, float]], None]
"""Called on rank 0 after every optimizer step with (step, metrics): a launcher's progress bar."""


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` leaves behind (the same on every rank)."""

    step: int
    """The last optimizer step taken (== max_steps when the run finished)."""
    finished: bool
    """False when the run stopped early (signal or stop_after_steps) after checkpointing."""
    export_dir: Path | None
    """The export directory, when the run finished with train.export on."""
    val_loss: float | None
    """The final validation loss (finished runs)."""
    model: nn.Module
    """The trained module (the engine's; partitioned under ZeRO-3)."""
    tracking: tuple[str, str] | None = None
    """(MLflow tracking URI, run id) on rank 0 while tracking was up."""
    engine: Any = dataclasses.field(default=None, repr=False)
    """The DeepSpeed engine (for tests and tools that inspect optimizer state)."""


def resolve_ds_config(ds_config: dict[str, Any], max_steps: int, world: int, device: torch.device, *,
                      warn: bool = True) -> dict[str, Any]:
    """Check the DeepSpeed config against the run and fill in what follows from it.

    On a machine without a GPU, a GPU config (bf16/fp16, DeepSpeed's compiled Adam) runs
    in fp32 with torch's AdamW instead, after one warning line: users type the documented
    `--ds_config ds_configs/zero2.json` everywhere.
    """
    ds = copy.deepcopy(ds_config)
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise PipelineError("the DeepSpeed config must set train_micro_batch_size_per_gpu (a positive integer)")
    if not isinstance(accum, int) or accum < 1:
        raise PipelineError("gradient_accumulation_steps must be a positive integer")
    total = ds.get("train_batch_size")
    if total is not None and total != micro * accum * world:
        raise PipelineError(
            f"DeepSpeed train_batch_size={total} but micro batch {micro} x accumulation {accum} x "
            f"world size {world} = {micro * accum * world}; fix one of them (or drop train_batch_size)")
    ds["train_batch_size"] = micro * accum * world
    params = ds.get("scheduler", {}).get("params", {})
    if "total_num_steps" in params:
        params["total_num_steps"] = max_steps
        params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(max_steps // 10, 1))
    if device.type == "cpu":
        changed = []
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled"):
                ds[key]["enabled"] = False
                changed.append(f"{key} off (fp32)")
        opt = ds.get("optimizer", {})
        if opt.get("type", "").lower() in ("adam", "adamw") and not opt.get("params", {}).get("torch_adam"):
            opt.setdefault("params", {})["torch_adam"] = True
            changed.append("torch AdamW instead of DeepSpeed's compiled Adam")
        if changed and warn:
            log.warning("no GPU: running this DeepSpeed config on CPU with %s (ds_configs/zero2_cpu.json "
                        "is the CPU config)", ", ".join(changed))
    return ds


def optimizer_groups(groups: list[dict[str, Any]], ds: dict[str, Any]) -> list:
    """What DeepSpeed's optimizer gets: the plain parameter list when every group trains at the
    config's lr, else one group per `lr_scale` with its own lr (the scheduler scales each)."""
    if all(g.get("lr_scale", 1.0) == 1.0 for g in groups):
        return [p for g in groups for p in g["params"]]
    scheduler = ds.get("scheduler", {}).get("type")
    if scheduler not in (None, "WarmupCosineLR"):
        raise PipelineError(f"train.base_lr_scale needs the WarmupCosineLR scheduler, which keeps each parameter "
                            f"group's own lr; this DeepSpeed config uses {scheduler} (it sets one lr for all)")
    lr = ds.get("optimizer", {}).get("params", {}).get("lr")
    if not isinstance(lr, (int, float)):
        raise PipelineError("train.base_lr_scale needs optimizer.params.lr in the DeepSpeed config")
    return [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in groups]


def train(task: Task, ds_config: dict[str, Any], *, resume: str | None = None,
          on_step: StepCallback | None = None) -> TrainResult:
    """Run (or continue) `task`'s training on every rank of the process group."""
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    loop = task.config.train
    ds = resolve_ds_config(ds_config, loop.max_steps, world, device, warn=rank == 0)
    layout = BatchLayout(ds["train_micro_batch_size_per_gpu"], ds.get("gradient_accumulation_steps", 1), world,
                         rank, device)
    model = task.build(layout)
    groups = [g for g in task.param_groups(model) if g["params"]]
    trainable = [p for g in groups for p in g["params"]]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(groups, ds), config=ds)
    run_dir = Path(loop.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    start = checkpoint.resume(engine, ckpt_dir, resume, rank=rank, world=world)

    tracker = Tracker(task.config.tracking, run_dir, is_rank0=rank == 0, flush_every=loop.log_every)
    meta = None
    if rank == 0:
        meta = task.checkpoint_meta()
        run_dir.mkdir(parents=True, exist_ok=True)
        tracker.drop_rows_after(start)  # the steps about to be replayed were logged by the killed run
        (run_dir / checkpoint.CONFIG_FILE).write_text(json.dumps(task.config_dict(), indent=2))
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
        tracker.log_params({"task": task.kind, "pipeline": task.config_dict(), "deepspeed": ds,
                            "git_revision": _git_revision(), **task.provenance(), "world_size": world,
                            "trainable_params": sum(p.numel() for p in trainable)})
        for path in (run_dir / checkpoint.CONFIG_FILE, run_dir / "ds_config.json", *task.artifacts()):
            tracker.log_artifact(path)
    peak = peak_tflops(device)

    stop = _StopFlag()
    step, ran, skipped = start, 0, 0
    metrics: dict[str, float] = {}
    while step < loop.max_steps:
        t0 = time.perf_counter()
        task.before_step(step, engine)
        local, skipped_now = _run_step(task, engine, trainable, layout, step, loop.nan_policy, dist)
        skipped += skipped_now
        metrics = _mean_over_ranks(local, dist, device)
        step += 1
        ran += 1
        dt = time.perf_counter() - t0
        flops, tokens = metrics.pop("flops") * world, metrics.pop("tokens") * world
        metrics |= {"lr": engine.get_lr()[0], "tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12,
                    "skipped_batches": skipped, "memory_mb": _memory_mb(device)}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        utilisation = mfu(metrics["tflops"], peak, world)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        if loop.eval_every and step % loop.eval_every == 0:
            metrics |= _validate(task, engine)
        tracker.log_metrics(metrics, step)
        if rank == 0:
            if on_step is not None:
                on_step(step, metrics)
            if step % loop.log_every == 0 or step == loop.max_steps:
                log.debug("step %d/%d loss %.4f  %.0f tok/s", step, loop.max_steps, metrics.get("loss", math.nan),
                          metrics["tokens_per_s"])
        # Ranks see a signal at different moments; they must agree on the step they stop after,
        # or one would checkpoint while another waits in the next step's all-reduce.
        stopping = _any_rank(stop.requested, dist, device) or bool(loop.stop_after_steps and
                                                                  ran >= loop.stop_after_steps)
        if stopping or step == loop.max_steps or (loop.checkpoint_every and step % loop.checkpoint_every == 0):
            checkpoint.save(engine, ckpt_dir, step, task, meta, rank)
            tracker.flush()  # MLflow holds every step the checkpoint covers
        if stopping and step < loop.max_steps:
            log.warning("stopped at step %d; continue with --resume auto", step)
            tracker.finish()
            stop.restore()
            return TrainResult(step=step, finished=False, export_dir=None, val_loss=None, model=model, engine=engine)

    if "val_loss" not in metrics:
        metrics = _validate(task, engine)
        tracker.log_metrics(metrics, step)
    export_dir = None
    if loop.export:
        export_dir = run_dir / "export"
        if rank == 0:
            export_checkpoint(ckpt_dir / f"step{step}", export_dir, overwrite=True)
            tracker.log_artifact(export_dir / "pipeline.json")
        dist.barrier()
    if rank == 0:
        tracker.log_artifact(plot_metrics(tracker.metrics_file, run_dir / "loss.png") or run_dir / "loss.png")
    tracker.finish()
    stop.restore()
    return TrainResult(step=step, finished=True, export_dir=export_dir, val_loss=metrics["val_loss"], model=model,
                       tracking=(tracker.uri, tracker.run_id) if tracker.run_id else None, engine=engine)


# ---------------------------------------------------------------------- one optimizer step
def _run_step(task: Task, engine, trainable: list[nn.Parameter], layout: BatchLayout, step: int,
              nan_policy: str, dist) -> tuple[dict[str, float], int]:
    """All micro-batches of optimizer step `step` on this rank: local metric sums and drops."""
    sums: dict[str, float] = {"flops": 0.0, "tokens": 0.0}
    kept = dropped = 0
    for m in range(layout.accumulation):
        batch = task.batch(step, m)
        out = task.loss(engine, batch)
        loss = out.loss
        if not _all_finite(loss, dist):
            if nan_policy == "stop":
                raise PipelineError(f"non-finite loss at step {step}; stopping without a checkpoint "
                                    "(lower the learning rate, or set train.nan_policy=skip)")
            dropped += 1
            log.warning("non-finite loss at step %d, micro-batch %d: dropped", step, m)
            loss = _zero_loss(trainable)
        else:
            kept += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        engine.backward(loss)
        if m == layout.accumulation - 1 and kept == 0:
            _step_without_update(engine)
        else:
            engine.step()
        sums["flops"] += task.flops(batch)
        sums["tokens"] += task.tokens(batch)
    local = {"flops": sums.pop("flops"), "tokens": sums.pop("tokens")}
    if kept:
        local |= {name: total / kept for name, total in sums.items()}
    return local, dropped


def _zero_loss(trainable: list[nn.Parameter]) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter: backward still
    visits each one, so DeepSpeed's gradient hooks and reductions run as on a normal step."""
    return sum((p.sum() * 0.0 for p in trainable), trainable[0].new_zeros(()))


def _step_without_update(engine) -> None:
    """The boundary `engine.step()` of a step whose every micro-batch was dropped, at lr 0:
    parameters stay put, while the step count and the scheduler advance as usual."""
    groups = engine.optimizer.param_groups
    saved = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    engine.step()
    if engine.lr_scheduler is None:  # a scheduler has set the next step's lr; otherwise restore it
        for g, lr in zip(groups, saved, strict=True):
            g["lr"] = lr


@torch.no_grad()
def _validate(task: Task, engine) -> dict[str, float]:
    engine.eval()
    try:
        return task.validate(engine)
    finally:
        engine.train()


# ---------------------------------------------------------------------- pieces
class _StopFlag:
    """SIGTERM/SIGINT, or the end of the `deepspeed` runner, ask for a checkpoint at the end
    of the current step.

    SIGTERM to the `deepspeed` runner (what a scheduler or `docker stop` sends to a job's
    first process) ends the runner alone: on one node it forwards no signal, and its child
    launch.py, re-parented, leaves the ranks training on as orphans that never checkpoint.
    So a rank started by launch.py watches launch.py's parent, and stops as on SIGTERM once
    that parent has gone.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._done = threading.Event()
        launcher = os.getppid()
        runner = _parent_of(launcher)
        if runner is not None and b"deepspeed.launcher.launch" in _cmdline(launcher):
            threading.Thread(target=self._watch, args=(launcher, runner), daemon=True).start()

    def restore(self) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)
        self.requested = True

    def _watch(self, launcher: int, runner: int) -> None:
        while not self._done.wait(1.0):
            if _parent_of(launcher) != runner:
                log.warning("the deepspeed runner (pid %d) has ended: checkpointing at the end of this step, "
                            "then stopping", runner)
                self.requested = True
                return


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (None where there is no /proc, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _all_finite(loss: torch.Tensor, dist) -> bool:
    """Every rank must agree, or ranks that skip would hang the others' all-reduce."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
    dist.all_reduce(bad)
    return bad.item() == 0


def _any_rank(flag: bool, dist, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _mean_over_ranks(values: dict[str, float], dist, device: torch.device) -> dict[str, float]:
    """One all-reduce for all of a step's metrics (every rank has the same keys)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
