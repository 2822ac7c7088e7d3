"""The DeepSpeed training loop for one variant: build, check, train, checkpoint, export.

    cfg = load_config("tiny-liu", ["data.path=runs/data"])
    result = train(cfg, json.load(open("ds_configs/zero2_cpu.json")), resume="auto")
    result.export_dir, result.step, result.val_loss, result.model

Everything DeepSpeed-specific is here; the model is a plain `DualModel`. The data
order and the site draws are functions of (seed, step), so a checkpoint needs only
the step beside DeepSpeed's own state to continue exactly (`pipeline.train.data`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import to_dict
from pipeline.data.shards import Manifest, load_manifest
from pipeline.dual import DualModel
from pipeline.errors import PipelineError
from pipeline.models import build_model, from_pretrained, preset
from pipeline.models.benchmark import PEAK_BF16_TFLOPS
from pipeline.train.config import TrainConfig
from pipeline.train.data import BatchOrder, PackedSequences, site_generator
from pipeline.train.tracking import Tracker, plot_metrics

log = logging.getLogger(__name__)
CONFIG_FILE = "pipeline_config.json"
EVAL_STEP = 10**9  # site draws of validation batches use their own stream


# ---------------------------------------------------------------------- building
def build_dual(cfg: TrainConfig, manifest: Manifest) -> DualModel:
    """The run's model: Base from a checkpoint or a seeded preset, wrapped for the variant."""
    torch.manual_seed(cfg.data.seed)
    if cfg.model.path:
        path = Path(cfg.model.path)
        # An export directory (pipeline.json + base/) stands for its Base.
        base = from_pretrained(path / "base" if (path / "base" / "config.json").is_file() else path)
    else:
        data_ids = {"vocab_size": manifest.vocab_size, "eos_token_id": manifest.eos_id}
        base = build_model(preset(cfg.model.preset, **(data_ids | cfg.model.overrides)))
    mc = base.config
    if cfg.model.path and mc.eos_token_id is not None and mc.eos_token_id != manifest.eos_id:
        # Sizes alone miss a different tokenizer of a large enough vocabulary (GPT-2 vs a small spm).
        raise PipelineError(
            f"the model at {cfg.model.path} ends documents with id {mc.eos_token_id} but the data's "
            f"tokenizer ({manifest.to_json().get('tokenizer', {}).get('path', '?')}) uses {manifest.eos_id}: "
            "the data was tokenized with a different tokenizer than the model's; rebuild it with the model's")
    if manifest.vocab_size > mc.vocab_size:
        raise PipelineError(
            f"the data's tokenizer has {manifest.vocab_size} ids but the model's vocabulary is "
            f"{mc.vocab_size}: use a model whose vocabulary covers the tokenizer, or rebuild the data"
        )
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise PipelineError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                            f"max_position_embeddings={mc.max_position_embeddings}")
    base.activation_checkpointing = cfg.model.activation_checkpointing
    return DualModel(base, cfg.dual, eos_id=manifest.eos_id)


def resolve_ds_config(cfg: TrainConfig, ds_config: dict[str, Any], world: int, device: torch.device) -> dict[str, Any]:
    """Check the DeepSpeed config against the run and fill in what follows from it."""
    ds = copy.deepcopy(ds_config)
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise PipelineError("the DeepSpeed config must set train_micro_batch_size_per_gpu (a positive integer)")
    total = ds.get("train_batch_size")
    if total is not None and total != micro * accum * world:
        raise PipelineError(
            f"DeepSpeed train_batch_size={total} but micro batch {micro} x accumulation {accum} x "
            f"world size {world} = {micro * accum * world}; fix one of them (or drop train_batch_size)"
        )
    ds["train_batch_size"] = micro * accum * world
    params = ds.get("scheduler", {}).get("params", {})
    if "total_num_steps" in params:
        params["total_num_steps"] = cfg.train.max_steps
        params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(cfg.train.max_steps // 10, 1))
    if device.type == "cpu":
        if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
            raise PipelineError("bf16/fp16 is enabled in the DeepSpeed config but there is no GPU: "
                                "use ds_configs/zero2_cpu.json (fp32) on CPU")
        opt = ds.get("optimizer", {})
        if opt.get("type", "").lower() in ("adam", "adamw") and not opt.get("params", {}).get("torch_adam"):
            raise PipelineError("on CPU set optimizer.params.torch_adam=true (as ds_configs/zero2_cpu.json "
                                "does) rather than compiling DeepSpeed's CPU Adam")
    return ds


def step_flops(dual: DualModel, batch: int, seq_len: int) -> float:
    """Estimated training FLOPs of one step: 2 (forward) + 2 (input grads) + 2 (weight grads) x
    matmul parameters x tokens, per pass, counting only the backward work that really runs.

    A frozen Base costs forward only in pass 1 (nothing upstream of it trains) and forward +
    input grads in the decode pass (gradients flow through it to the latents); attention's
    own FLOPs are left out (small next to the matmuls at these sequence lengths).
    """
    cfg, spec = dual.config, dual.config.spec
    n_base = dual.base.num_params(matmul_only=True)
    train_base = cfg.train_base
    flops = (6 if train_base else 2) * n_base * seq_len  # pass 1 (the only pass without augmentation)
    if spec.augments:
        slots = 0 if spec.slots == "coprocessor_kv" else cfg.n_latents
        block = slots + int(cfg.reread) + cfg.n_ahead - 1
        flops += (6 if train_base else 4) * n_base * cfg.n_sites * block  # pass 3
    if dual.coprocessor is not None:
        cop_tokens = cfg.n_sites * cfg.n_latents + (seq_len if cfg.coprocessor_input == "last_hidden" else 0)
        per_token = 6 if cfg.coprocessor_adapter == "full" else 4  # LoRA: weight grads of the adapters only
        flops += per_token * dual.coprocessor.num_params(matmul_only=True) * cop_tokens
    return float(flops * batch)


# ---------------------------------------------------------------------- the loop
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
    model: DualModel
    """The trained model (the engine's module; partitioned under ZeRO-3)."""
    tracking: tuple[str, str] | None = None
    """(MLflow tracking URI, run id) on rank 0 while tracking was up."""


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)
        self.requested = True


def train(cfg: TrainConfig, ds_config: dict[str, Any], *, resume: str | None = None) -> TrainResult:
    """Run (or continue) one training run on every rank of the process group."""
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not cfg.data.path:
        raise PipelineError("data.path is not set: point it at a data-prep output directory")
    manifest = load_manifest(cfg.data.path)
    ds = resolve_ds_config(cfg, ds_config, world, device)
    train_data = PackedSequences(manifest, "train", cfg.data.seq_len)
    val_data = PackedSequences(manifest, "validation", cfg.data.seq_len)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds.get("gradient_accumulation_steps", 1)
    order = BatchOrder(len(train_data), cfg.data.seed, micro, accum, world)

    dual = build_dual(cfg, manifest)
    trainable = [p for p in dual.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=dual, model_parameters=trainable, config=ds)
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    start = _maybe_resume(engine, ckpt_dir, resume)

    tracker = Tracker(cfg.tracking, run_dir, is_rank0=rank == 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
        tracker.log_params({"pipeline": to_dict(cfg), "deepspeed": ds, "git_revision": _git_revision(),
                            "data": {k: v for k, v in manifest.to_json().items() if k != "shards"},
                            "world_size": world, "trainable_params": sum(p.numel() for p in trainable)})
        for name in (CONFIG_FILE, "ds_config.json"):
            tracker.log_artifact(run_dir / name)
        tracker.log_artifact(Path(cfg.data.path) / "manifest.json")
    flops = step_flops(dual, order.global_batch, cfg.data.seq_len)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None

    stop = _StopFlag()
    step, ran, skipped = start, 0, 0
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for m in range(accum):
            x = train_data.batch(order.indices(step, m, rank)).to(device)
            sites = None
            if cfg.dual.spec.augments:
                sites = dual.sample_sites(x, site_generator(cfg.data.seed, step, m, rank))
            out = engine(x, sites)
            if not _all_finite(out.loss, dist):
                if cfg.train.nan_policy == "stop":
                    raise PipelineError(f"non-finite loss at step {step}; stopping without a checkpoint "
                                        "(lower the learning rate, or set train.nan_policy=skip)")
                skipped += 1
                log.warning("non-finite loss at step %d: batch skipped (%d so far)", step, skipped)
                continue
            engine.backward(out.loss)
            engine.step()
            for name in ("loss", "ahead_loss", "lm_loss", "orthogonality"):
                value = getattr(out, name)
                if value is not None:
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / accum
        metrics = {k: _mean_over_ranks(v, dist, device) for k, v in sums.items()}
        step += 1
        ran += 1
        dt = time.perf_counter() - t0
        metrics |= {"lr": engine.get_lr()[0], "tokens_per_s": order.global_batch * cfg.data.seq_len / dt,
                    "tflops": flops / dt / 1e12, "skipped_batches": skipped, "memory_mb": _memory_mb(device)}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if peak:
            metrics["mfu"] = metrics["tflops"] / (peak * world)  # tflops counts all ranks
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            metrics["val_loss"] = _validate(engine, dual, val_data, cfg, micro, device)
        tracker.log_metrics(metrics, step)
        if rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
            log.info("step %d/%d loss %.4f  %.0f tok/s", step, cfg.train.max_steps, metrics.get("loss", math.nan),
                     metrics["tokens_per_s"])
        # Ranks see a signal at different moments; they must agree on the step they stop after,
        # or one would checkpoint while another waits in the next step's all-reduce.
        stopping = _any_rank(stop.requested, dist, device) or bool(
            cfg.train.stop_after_steps and ran >= cfg.train.stop_after_steps)
        if stopping or step == cfg.train.max_steps or (cfg.train.checkpoint_every
                                                       and step % cfg.train.checkpoint_every == 0):
            _save(engine, ckpt_dir, step, cfg, rank)
        if stopping and step < cfg.train.max_steps:
            log.warning("stopped at step %d; continue with --resume auto", step)
            tracker.finish()
            stop.restore()
            return TrainResult(step=step, finished=False, export_dir=None, val_loss=None, model=dual)

    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and ran:
        val_loss = metrics["val_loss"]
    else:
        val_loss = _validate(engine, dual, val_data, cfg, micro, device)
        tracker.log_metrics({"val_loss": val_loss}, step)
    export_dir = None
    if cfg.train.export:
        export_dir = run_dir / "export"
        if rank == 0:
            from pipeline.train.export import export_checkpoint

            export_checkpoint(ckpt_dir / f"step{step}", export_dir, overwrite=True)
            tracker.log_artifact(export_dir / "pipeline.json")
        dist.barrier()
    if rank == 0:
        tracker.log_artifact(plot_metrics(tracker.metrics_file, run_dir / "loss.png") or run_dir / "loss.png")
    tracker.finish()
    stop.restore()
    return TrainResult(step=step, finished=True, export_dir=export_dir, val_loss=val_loss, model=dual,
                       tracking=(tracker.uri, tracker.run_id) if tracker.run_id else None)


# ---------------------------------------------------------------------- pieces
def _maybe_resume(engine, ckpt_dir: Path, resume: str | None) -> int:
    if not resume:
        return 0
    if resume == "auto":
        if not (ckpt_dir / "latest").is_file():
            log.info("no checkpoint in %s: starting from step 0", ckpt_dir)
            return 0
        load_dir, tag = ckpt_dir, None
    else:
        path = Path(resume)
        load_dir, tag = (path, None) if (path / "latest").is_file() else (path.parent, path.name)
        if not (load_dir / (tag or "")).exists():
            raise PipelineError(f"--resume {resume}: no DeepSpeed checkpoint there")
    loaded, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if loaded is None:
        raise PipelineError(f"could not load a checkpoint from {load_dir} (tag {tag or 'latest'})")
    log.info("resumed from %s at step %d", loaded, client["step"])
    return int(client["step"])


def _save(engine, ckpt_dir: Path, step: int, cfg: TrainConfig, rank: int) -> None:
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    if rank == 0:
        (ckpt_dir / tag / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))


@torch.no_grad()
def _validate(engine, dual: DualModel, val_data: PackedSequences, cfg: TrainConfig, micro: int,
              device: torch.device) -> float:
    """Mean loss over the first `eval_sequences` validation sequences (same on every rank)."""
    engine.eval()
    n = min(cfg.train.eval_sequences, len(val_data))
    losses = []
    for i, first in enumerate(range(0, n, micro)):
        x = val_data.batch(list(range(first, min(first + micro, n)))).to(device)
        sites = dual.sample_sites(x, site_generator(cfg.data.seed, EVAL_STEP, i, 0)) if cfg.dual.spec.augments else None
        out = engine(x, sites)
        losses.append(float(out.ahead_loss if out.ahead_loss is not None else out.loss))
    engine.train()
    return sum(losses) / max(len(losses), 1)


def _all_finite(loss: torch.Tensor, dist) -> bool:
    """Every rank must agree, or ranks that skip would hang the others' all-reduce."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
    dist.all_reduce(bad)
    return bad.item() == 0


def _any_rank(flag: bool, dist, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _mean_over_ranks(value: float, dist, device: torch.device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


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
