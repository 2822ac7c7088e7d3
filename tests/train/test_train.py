"""Training under real DeepSpeed on 2 gloo CPU ranks: every variant, ZeRO 1/2/3, exact resume,
NaN policy, clear early errors, MLflow against a live server that dies mid-run, and the
export read back by `transformers` and by `load_dual`.

All distributed work happens in ONE spawn of `run_distributed(dist_checks.all_checks)`
(module fixture `checks`); each test asserts on one part of what it returned.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # dist_checks/conftest importable by the spawned ranks

import dist_checks  # noqa: E402

from pipeline.train.testing import free_port, run_distributed  # noqa: E402


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store, in its own process group."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "mlflow.db"
        self.log = open(root / "server.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(root / "artifacts"),
             "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _stop_when_step(server: MlflowServer, metrics: Path, step: int, stopped_at: list[int]) -> None:
    """Stop the server once the run's metrics.jsonl reaches `step` (the run must then go on)."""
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline and server.proc.poll() is None:
        if metrics.is_file():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                stopped_at.append(max(steps))
                server.stop()
                return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def checks(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("train")
    server_root = tmp_path_factory.mktemp("mlflow_server")
    server = MlflowServer(server_root)
    stopped_at: list[int] = []
    killer = threading.Thread(target=_stop_when_step, daemon=True,
                              args=(server, root / "mlflow" / "metrics.jsonl", 30, stopped_at))
    killer.start()
    try:
        results = run_distributed(dist_checks.all_checks, corpus_dir, root, server.uri, world_size=2)
    finally:
        server.stop()
    return {"rank0": results[0], "rank1": results[1], "root": root, "server": server, "stopped_at": stopped_at,
            "data": corpus_dir}


# ------------------------------------------------------------------ errors before training
@pytest.mark.parametrize("case,words", [
    ("batch", "train_batch_size=3"),
    ("vocab", "vocabulary"),
    ("shards", "manifest"),
    ("seq_len", "max_position_embeddings"),
    ("tokenizer", "different tokenizer"),
])
def test_misconfiguration_fails_clearly_before_training(checks, case, words):
    message = checks["rank0"]["errors"][case]
    assert message is not None, f"{case}: no error"
    assert words in message
    assert checks["rank0"]["errors_trained"] == [False] * 5


def test_the_gpu_ds_config_runs_on_cpu_in_fp32(checks):
    losses = checks["rank0"]["gpu_config_losses"]
    assert len(losses) == 2 and all(map(math.isfinite, losses))


def test_unknown_config_key_names_the_dotted_key():
    from pipeline.errors import PipelineError
    from pipeline.train.config import load_config

    with pytest.raises(PipelineError, match="train.max_stepz"):
        load_config("tiny-liu", ["train.max_stepz=3"])


# ------------------------------------------------------------------ training
def test_base_pretraining_loss_falls(checks):
    losses = checks["rank0"]["base"]["losses"]
    assert len(losses) == dist_checks.BASE_STEPS and all(map(math.isfinite, losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0


@pytest.mark.parametrize("variant", dist_checks.DUAL_VARIANTS)
def test_every_variant_trains_under_zero2(checks, variant):
    row = checks["rank0"]["variants"][variant]
    assert len(row["losses"]) == dist_checks.VARIANT_STEPS and all(map(math.isfinite, row["losses"]))
    val = row["val"]  # the same validation sequences and sites after every step
    assert val[-1] < val[0], f"{variant}: validation loss did not fall: {val[0]:.4f} -> {val[-1]:.4f}"
    assert checks["rank1"]["variants"][variant]["losses"] == row["losses"]  # ranks agree on the mean


@pytest.mark.parametrize("stage", list(dist_checks.STAGE_RUNS))
def test_zero1_and_zero3_train_and_export(checks, stage):
    from pipeline.dual import load_dual

    row = checks["rank0"]["stages"][stage]
    assert len(row["losses"]) == 4 and all(map(math.isfinite, row["losses"]))
    variant = dist_checks.STAGE_RUNS[stage].removeprefix("tiny-")
    assert load_dual(row["export"]).config.variant == variant


@pytest.mark.parametrize("stage", ["zero3", "zero3_cp"])
def test_zero3_matches_zero2(checks, stage):
    """ZeRO stages change how state is sharded, not the maths (fp32 on CPU): a dual variant with
    soft tokens and a Coprocessor, and plain continued pretraining."""
    row = checks["rank0"]["stages"][stage]
    np.testing.assert_allclose(row["losses"], row["zero2_losses"], rtol=1e-4)


def test_resume_gives_identical_losses(checks):
    r = checks["rank0"]["resume"]
    assert not r["first_finished"] and r["first_step"] == dist_checks.RESUME_N
    assert r["second_step"] == 2 * dist_checks.RESUME_N
    assert len(r["straight"]) == 2 * dist_checks.RESUME_N
    assert r["split"] == r["straight"]  # exact, fp32 on CPU


def test_nan_policy(checks):
    assert checks["rank0"]["nan_stop"] is not None and "non-finite loss" in checks["rank0"]["nan_stop"]
    assert checks["rank0"]["nan_stop_checkpoints"] == []  # never a checkpoint of garbage
    skip = checks["rank0"]["nan_skip"]
    assert skip["finished"] and skip["skipped"] > 0


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("variant", ["liu", "h1", "pause"])
def test_export_loads_in_transformers_with_the_training_logits(checks, variant):
    from transformers import AutoModelForCausalLM

    row = checks["rank0"]["variants"][variant]
    ref, export = row["reference"], Path(row["export"])
    meta = json.loads((export / "pipeline.json").read_text())
    assert meta["variant"] == variant and meta["n_latents"] == 4 and meta["n_ahead"] == 4
    assert Path(meta["run_config"]["data"]["path"]) == checks["data"].resolve()
    x = torch.from_numpy(ref["x"])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(export / "base").eval()
        torch.testing.assert_close(hf(x).logits, torch.from_numpy(ref["base_logits"]), atol=1e-4, rtol=1e-4)
        if "coprocessor_logits" in ref:
            cop = AutoModelForCausalLM.from_pretrained(export / "coprocessor").eval()
            torch.testing.assert_close(cop(x).logits, torch.from_numpy(ref["coprocessor_logits"]),
                                       atol=1e-4, rtol=1e-4)
    from safetensors.torch import load_file

    assert load_file(export / "latents.safetensors")["soft_tokens"].shape[0] == 4


@pytest.mark.parametrize("variant", ["liu", "h1", "h2"])
def test_exported_per_site_scores_equal_the_training_model(checks, variant):
    from pipeline.dual import load_dual

    ref = checks["rank0"]["variants"][variant]["reference"]
    dual = load_dual(checks["rank0"]["variants"][variant]["export"]).eval()
    x, sites = torch.from_numpy(ref["x"]), torch.from_numpy(ref["sites"])
    with torch.no_grad():
        torch.testing.assert_close(dual.score_sites(x, sites, k=4, augment=True), torch.from_numpy(ref["scores"]),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dual.score_sites(x, sites, k=4, augment=False),
                                   torch.from_numpy(ref["scores_base"]), atol=1e-4, rtol=1e-4)


def test_export_needs_no_data_dir_and_refuses_a_changed_frozen_base(checks):
    """The run directory moved and the data directory deleted: export from the checkpoint alone
    gives the model the run exported; after one weight of the frozen Base changes, it refuses."""
    from pipeline.dual import load_dual

    r = checks["rank0"]["portable"]
    x = torch.from_numpy(dist_checks._val_batch(checks["data"]))
    a, b = load_dual(r["export"]).eval(), load_dual(r["original"]).eval()
    sites = a.sample_sites(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.base(x).logits, b.base(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(a.score_sites(x, sites, k=4), b.score_sites(x, sites, k=4), rtol=0, atol=0)
    assert r["changed_base"] is not None and "changed since training" in r["changed_base"]
    assert not r["changed_base_exported"]


def test_continued_pretraining_exports_a_plain_hf_model(checks):
    from transformers import AutoModelForCausalLM

    export = Path(checks["rank0"]["base"]["export"])
    assert (export / "pipeline.json").is_file() and not (export / "coprocessor").exists()
    assert sorted(p.name for p in (export / "base").iterdir()) == ["config.json", "model.safetensors"]
    AutoModelForCausalLM.from_pretrained(export / "base")
    meta = json.loads((export / "pipeline.json").read_text())
    assert meta["variant"] == "continued_pretraining" and Path(meta["run_config"]["tokenizer"]["path"]).is_file()


# ------------------------------------------------------------------ MLflow
def test_mlflow_server_receives_the_run_and_its_loss_does_not_kill_it(checks):
    import mlflow
    from mlflow.tracking import MlflowClient

    r = checks["rank0"]["mlflow"]
    assert checks["stopped_at"], "the test never stopped the server"
    assert r["finished"] and Path(r["export"], "pipeline.json").is_file()
    assert r["steps"] == list(range(1, dist_checks.MLFLOW_STEPS + 1))  # every step ran and was logged locally
    # The server is gone; read its store directly.
    mlflow.set_tracking_uri(f"sqlite:///{checks['server'].db}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("train-test")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'mlflow-check'")
    params = run.data.params
    assert params["pipeline.dual.variant"] == "liu" and "deepspeed.zero_optimization.stage" in params
    assert params["git_revision"] and "data.vocab_size" in params
    history = client.get_metric_history(run.info.run_id, "loss")
    assert 1 <= len(history) < dist_checks.MLFLOW_STEPS  # logged until the server went down
    for name in ("lr", "grad_norm", "tokens_per_s", "memory_mb", "ahead_loss"):
        assert client.get_metric_history(run.info.run_id, name), name
    store = checks["server"].db.parent / "artifacts"  # the server's --artifacts-destination
    artifacts = {p.name for p in store.rglob(f"*{run.info.run_id}*/artifacts/*")}
    assert {"pipeline_config.json", "ds_config.json", "manifest.json"} <= artifacts
