"""The checks that need a process group, run once on 2 gloo ranks (see test_train.py).

One spawn of `run_distributed(all_checks, ...)` runs every check in sequence and
returns plain data (rank 0's view); the tests then assert on it. Starting the
ranks costs seconds, each tiny training run a fraction of one, so batching them
keeps the suite fast.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import torch

from pipeline.errors import PipelineError

DUAL_VARIANTS = ["liu", "h1", "h2", "soft_embedding", "pause"]
BASE_STEPS = 120
VARIANT_STEPS = 30
RESUME_N = 3
MLFLOW_STEPS = 150
STAGE_RUNS = {"zero1": "tiny-h2", "zero3": "tiny-liu", "zero3_cp": "tiny-continued_pretraining"}
STAGE_CONFIGS = {"zero1": "zero1", "zero3": "zero3", "zero3_cp": "zero3"}  # run -> ds_configs/<name>.json


def _ds(name: str = "zero2_cpu", lr: float = 1e-3, **changes) -> dict:
    from conftest import cpu_ds_config

    ds = cpu_ds_config(name, **changes)
    ds["optimizer"]["params"]["lr"] = lr
    return ds


def _cfg(preset: str, data: Path, out: Path, *overrides: str):
    from pipeline.train.config import load_config

    return load_config(preset, [f"data.path={data}", f"train.output_dir={out}", "tracking.enabled=false",
                                "train.eval_every=0", *overrides])


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in _metrics(run_dir) if "loss" in m]


def _error(fn) -> str | None:
    try:
        fn()
    except PipelineError as exc:
        return str(exc)
    return None


def train(cfg, ds: dict, **kwargs):
    """The loop over the dual-pretraining task, as the launcher runs it."""
    from pipeline.train.dual_task import DualPretraining
    from pipeline.train.trainer import train as run

    return run(DualPretraining(cfg), ds, **kwargs)


def all_checks(data: Path, out: Path, mlflow_uri: str) -> dict:

    rank = torch.distributed.get_rank()
    r: dict = {}
    t0 = time.perf_counter()

    # ---- clear errors before any training step
    foreign = out / "foreign_model"  # a vocabulary that covers the data's, but another tokenizer's EOS
    if rank == 0:
        from pipeline.models import build_model, preset

        build_model(preset("gpt2-tiny", vocab_size=1000, eos_token_id=999)).save_pretrained(foreign)
    torch.distributed.barrier()
    r["errors"] = {
        "tokenizer": _error(lambda: train(_cfg("tiny-liu", data, out / "e6", f"model.path={foreign}"), _ds())),
        "batch": _error(lambda: train(_cfg("tiny-liu", data, out / "e1"), _ds(train_batch_size=3))),
        "vocab": _error(lambda: train(_cfg("tiny-liu", data, out / "e2", "model.overrides.vocab_size=100"), _ds())),
        "shards": _error(lambda: train(_cfg("tiny-liu", out / "nowhere", out / "e3"), _ds())),
        "seq_len": _error(lambda: train(_cfg("tiny-liu", data, out / "e5", "data.seq_len=4096"), _ds())),
    }
    r["errors_trained"] = [bool(_metrics(out / f"e{i}")) for i in (1, 2, 3, 5, 6)]

    # ---- the GPU config as users type it (bf16, DeepSpeed's Adam) runs on CPU in fp32
    gpu_ds = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json").read_text())
    train(_cfg("tiny-liu", data, out / "gpu_config", "train.max_steps=2", "train.export=false"), gpu_ds)
    r["gpu_config_losses"] = _losses(out / "gpu_config")

    # ---- a Base first: the frozen-Base variants mean nothing on a random one
    base = train(_cfg("tiny-continued_pretraining", data, out / "base", f"train.max_steps={BASE_STEPS}"), _ds())
    r["base"] = {"losses": _losses(out / "base"), "export": str(base.export_dir)}

    # ---- every variant under ZeRO-2, on that Base; validation (fixed sequences and sites) every step
    x = torch.from_numpy(_val_batch(data))
    r["variants"] = {}
    for variant in DUAL_VARIANTS:
        res = train(_cfg(f"tiny-{variant}", data, out / variant, f"model.path={base.export_dir}",
                         f"train.max_steps={VARIANT_STEPS}", "train.eval_every=1", "train.eval_sequences=8"), _ds())
        row = {"losses": _losses(out / variant),
               "val": [m["val_loss"] for m in _metrics(out / variant) if "val_loss" in m],
               "export": str(res.export_dir), "final_val": res.val_loss}
        if rank == 0:
            row["reference"] = _reference_outputs(res.model, x)
        r["variants"][variant] = row

    # ---- a checkpoint exports anywhere: run dir moved, data dir deleted; a changed frozen Base is refused
    r["portable"] = _portable_export(data, out, Path(base.export_dir), rank)

    # ---- ZeRO-1 and ZeRO-3 (a dual variant with slots, and continued_pretraining), exported from
    # their checkpoints
    r["stages"] = {}
    for name, preset in STAGE_RUNS.items():
        res = train(_cfg(preset, data, out / name, f"model.path={base.export_dir}", "train.max_steps=4"),
                    _ds(STAGE_CONFIGS[name]))
        r["stages"][name] = {"losses": _losses(out / name), "export": str(res.export_dir)}
    # the same runs under ZeRO-2, to compare the stages' numerics
    for name in ("zero3", "zero3_cp"):
        train(_cfg(STAGE_RUNS[name], data, out / f"zero2_{name}", f"model.path={base.export_dir}",
                   "train.max_steps=4", "train.export=false"), _ds())
        r["stages"][name]["zero2_losses"] = _losses(out / f"zero2_{name}")

    # ---- exact resume: 2N steps in one go vs N, stop (checkpoint), resume N
    straight = _cfg("tiny-h2", data, out / "straight", f"model.path={base.export_dir}",
                    f"train.max_steps={2 * RESUME_N}", "train.export=false")
    train(straight, _ds())
    split = _cfg("tiny-h2", data, out / "split", f"model.path={base.export_dir}", f"train.max_steps={2 * RESUME_N}",
                 f"train.stop_after_steps={RESUME_N}", "train.export=false")
    first = train(split, _ds(), resume="auto")
    second = train(split, _ds(), resume="auto")
    r["resume"] = {"straight": _losses(out / "straight"), "split": _losses(out / "split"),
                   "first_finished": first.finished, "first_step": first.step, "second_step": second.step}

    # ---- non-finite losses: stop (no checkpoint) or skip
    nan_stop = _cfg("tiny-continued_pretraining", data, out / "nan_stop", "train.max_steps=30",
                    "train.checkpoint_every=0")
    r["nan_stop"] = _error(lambda: train(nan_stop, _ds(lr=1e12)))
    r["nan_stop_checkpoints"] = sorted(p.name for p in (out / "nan_stop" / "checkpoints").glob("step*"))
    nan_skip = _cfg("tiny-continued_pretraining", data, out / "nan_skip", "train.max_steps=30",
                    "train.nan_policy=skip", "train.export=false")
    res = train(nan_skip, _ds(lr=1e12))
    r["nan_skip"] = {"finished": res.finished, "skipped": max((m.get("skipped_batches", 0) for m in
                                                               _metrics(out / "nan_skip")), default=0)}

    # ---- MLflow: a real server (started by the test, stopped by it mid-run)
    if rank == 0:
        _wait_for(mlflow_uri + "/health", timeout=120)
    torch.distributed.barrier()
    res = train(_cfg("tiny-liu", data, out / "mlflow", f"model.path={base.export_dir}",
                     f"train.max_steps={MLFLOW_STEPS}", "tracking.enabled=true", f"tracking.tracking_uri={mlflow_uri}",
                     "tracking.experiment=train-test", "tracking.run_name=mlflow-check", "train.eval_every=50"),
                _ds())
    r["mlflow"] = {"finished": res.finished, "export": str(res.export_dir),
                   "steps": [m["step"] for m in _metrics(out / "mlflow") if "loss" in m]}
    r["seconds"] = time.perf_counter() - t0
    return r


def _portable_export(data: Path, out: Path, base_export: Path, rank: int) -> dict:
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.train.export import export_checkpoint

    data_copy, base_copy = out / "data_copy", out / "base_copy"
    if rank == 0:
        shutil.copytree(data, data_copy)
        shutil.copytree(base_export, base_copy)
    torch.distributed.barrier()
    train(_cfg("tiny-liu", data_copy, out / "portable", f"model.path={base_copy}", "train.max_steps=3"), _ds())
    result: dict = {}
    if rank == 0:
        moved = out / "moved" / "portable"
        moved.parent.mkdir()
        shutil.move(out / "portable", moved)
        shutil.rmtree(data_copy)
        tag = moved / "checkpoints" / "step3"
        result["export"] = str(export_checkpoint(tag, out / "portable_export"))
        result["original"] = str(moved / "export")
        weights = base_copy / "base" / "model.safetensors"
        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 1e-3
        save_file(tensors, str(weights), metadata={"format": "pt"})
        result["changed_base"] = _error(lambda: export_checkpoint(tag, out / "portable_export2"))
        result["changed_base_exported"] = (out / "portable_export2").exists()
    torch.distributed.barrier()
    return result


def _val_batch(data: Path):
    from pipeline.data.shards import load_manifest
    from pipeline.train.data import PackedSequences

    seqs = PackedSequences(load_manifest(data), "validation", 64)
    return seqs.batch([0, 1]).numpy()


@torch.no_grad()
def _reference_outputs(dual, x: torch.Tensor) -> dict:
    """What the trained in-memory model says, for comparison with its export."""
    dual.eval()
    sites = dual.sample_sites(x, torch.Generator().manual_seed(0))
    out = {"x": x.numpy(), "sites": sites.numpy(), "base_logits": dual.base(x).logits.numpy(),
           "scores": dual.score_sites(x, sites, k=4, augment=True).numpy(),
           "scores_base": dual.score_sites(x, sites, k=4, augment=False).numpy()}
    if dual.coprocessor is not None:
        out["coprocessor_logits"] = _merged_coprocessor(dual)(x).logits.numpy()
    dual.train()
    return out


def _merged_coprocessor(dual):
    import copy

    from pipeline.dual.lora import merge_lora

    cop = copy.deepcopy(dual.coprocessor)
    merge_lora(cop)
    return cop


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
