"""The launchers: presets, CLI surface, early errors, and one real `deepspeed` launch that is
stopped by SIGTERM (as a scheduler would), checkpoints, and exports through launchers/export.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.config import PRESET_DIR, load_config
from pipeline.train.configs import KINDS, load_task, load_task_config
from pipeline.train.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launchers"))

import export as export_cli  # noqa: E402
import pretrain  # noqa: E402

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_presets_exist_for_every_variant_and_real_sizes():
    from pipeline.dual import VARIANTS

    assert {f"tiny-{v}" for v in VARIANTS} <= set(PRESETS)
    assert {"gpt2-124m-liu", "qwen3-0.6b-h2"} <= set(PRESETS)
    reasoning = {f"reason-{t}-{c}{size}" for t in ("gsm8k", "prosqa", "countdown") for c in ("cot", "nocot")
                 for size in ("", "-gpt2-124m")}
    assert reasoning <= set(PRESETS)
    latent = {f"reason-{t}-{v}{size}" for t in ("gsm8k", "prosqa", "countdown")
              for v in ("liu", "h1", "h2", "soft_embedding", "pause") for size in ("", "-gpt2-124m")}
    assert latent <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    kind, cfg = load_task_config(name)
    assert isinstance(cfg, KINDS[kind][0])
    if kind == "dual_pretraining":
        assert cfg == load_config(name)  # presets without `task:` are what load_config reads
        assert cfg.dual.spec  # a known variant
    elif kind == "latent_sft":  # from the task's CoT fine-tune, the variant its name says
        task = name.split("-")[1]
        assert cfg.model.path.startswith(f"runs/reason-{task}-cot") and f"-{cfg.dual.variant}" in name
    elif kind == "reasoning_sft":
        assert name.startswith("reason-") and cfg.data.cot == ("-cot" in name)
    elif kind == "ltm":
        from pipeline.ltm import ltm_preset

        assert name.startswith("ltm-")
        assert cfg.data.seq_len <= ltm_preset(cfg.model.preset, **cfg.model.overrides).max_position_embeddings
    else:
        assert name.startswith("reason-") and f"-{kind}" in name  # e.g. reason-prosqa-coconut
    assert load_task(name).kind == kind
    from pipeline.models import preset

    if kind != "ltm" and not cfg.model.path:
        mc = preset(cfg.model.preset, **cfg.model.overrides)  # a valid model preset and overrides
        if kind != "dual_pretraining":
            assert cfg.data.max_len <= mc.max_position_embeddings


def test_dry_run_prints_a_reasoning_preset(capsys):
    rc = pretrain.main(["--ds_config", str(ROOT / "ds_configs/zero2_cpu.json"), "--config", "reason-prosqa-cot",
                        "data.max_len=600", "--dry-run"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "reasoning_sft" and out["pipeline"]["data"]["max_len"] == 600


def test_cli_surface():
    """Scripts and docs depend on these flags; change them deliberately."""
    flags = {opt for action in pretrain.parser()._actions for opt in action.option_strings}
    assert {"--ds_config", "--config", "--resume", "--dry-run", "--recipe-root"} <= flags


def test_dry_run_prints_resolved_configs(capsys):
    rc = pretrain.main(["--ds_config", str(ROOT / "ds_configs/zero2_cpu.json"), "--config", "tiny-h1",
                        "data.path=somewhere", "dual.n_sites=3", "--dry-run"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pipeline"]["dual"]["variant"] == "h1" and out["pipeline"]["dual"]["n_sites"] == 3
    assert out["deepspeed"]["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("argv,words", [
    (["--config", "tiny-liu", "train.max_stepz=3"], "train.max_stepz"),
    (["--config", "no-such-preset"], "presets:"),
    (["--config", "tiny-liu", "dual.variant=nope"], "nope"),
    (["--config", "tiny-liu", "train.nan_policy=ignore"], "train.nan_policy"),
    (["--config", "tiny-liu", "model.overrides.n_layr=3"], "model.overrides.n_layr"),
    (["--config", "reason-prosqa-cot", "data.cott=false"], "data.cott"),
    (["--config", "reason-prosqa-cot", "task=nope"], "nope"),
    (["model.overrides.n_layr=3"], "model.overrides.n_layr"),  # the default recipe's overrides too
])
def test_config_errors_exit_2_with_a_message(capsys, argv, words):
    rc = pretrain.main(["--ds_config", str(ROOT / "ds_configs/zero2_cpu.json"), *argv, "--dry-run"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err


@pytest.mark.parametrize("argv", [["--config", "tiny-liu"], ["--config", "reason-gsm8k-nocot"], []])
def test_unknown_model_override_fails_before_any_distributed_start(capsys, argv):
    import torch.distributed

    rc = pretrain.main(["--ds_config", str(ROOT / "ds_configs/zero2_cpu.json"), *argv, "data.path=x",
                        "model.overrides.n_layr=3"])
    assert rc == 2 and "model.overrides.n_layr" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_export_cli_errors(tmp_path, capsys):
    assert export_cli.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory, corpus_dir):
    """One real `deepspeed --num_gpus 2` launch (~25 s of start-up) of the GPU config on a machine
    without a GPU, stopped by SIGTERM to the `deepspeed` runner alone: what `docker stop` or a
    scheduler sends to a job's first process (DeepSpeed's runner forwards nothing on one node)."""
    tmp_path = tmp_path_factory.mktemp("sigterm")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launchers/pretrain.py", "--ds_config", "ds_configs/zero2.json",
         "--config", "tiny-liu", f"data.path={corpus_dir}", f"train.output_dir={out}",
         "train.max_steps=100000", "tracking.enabled=false", "train.eval_every=0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        os.kill(proc.pid, signal.SIGTERM)  # the runner only; its children must notice
        log, _ = proc.communicate(timeout=120)  # EOF once every rank has closed the pipe
        time.sleep(2)
        try:
            os.killpg(proc.pid, 0)
            orphans = True
        except ProcessLookupError:
            orphans = False
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"out": out, "log": log, "orphans": orphans, "tmp": tmp_path}


def test_sigterm_to_the_deepspeed_runner_checkpoints_then_exports(sigterm_run):
    """The ranks end the step both agree on, checkpoint, and exit (none left training); the
    checkpoint exports through launchers/export.py into a loadable model."""
    out, log = sigterm_run["out"], sigterm_run["log"]
    assert not sigterm_run["orphans"], log[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{steps[-1]}", log[-3000:]
    assert (out / "checkpoints" / latest / "complete.json").is_file()
    assert "continue with --resume auto" in log and "deepspeed runner" in log
    lines = log.splitlines()
    assert sum("no GPU: running this DeepSpeed config on CPU" in line for line in lines) == 1, log[-3000:]
    assert not any("all_gather_into_tensor" in line for line in lines)  # third-party noise filtered

    export = sigterm_run["tmp"] / "export"
    assert export_cli.main([str(out / "checkpoints"), str(export)]) == 0
    from pipeline.dual import load_dual

    dual = load_dual(export)
    assert dual.config.variant == "liu"


def test_resuming_a_corrupt_checkpoint_is_an_error_message(sigterm_run, corpus_dir):
    """A flipped byte in the model states: `pretrain.py --resume` says which file, exit 2."""
    import shutil

    ckpts = sigterm_run["tmp"] / "corrupt" / "checkpoints"
    shutil.copytree(sigterm_run["out"] / "checkpoints", ckpts)
    tag = ckpts / (ckpts / "latest").read_text().strip()
    data = bytearray((tag / "mp_rank_00_model_states.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/zero2_cpu.json", "--config", "tiny-liu",
         f"data.path={corpus_dir}", f"train.output_dir={ckpts.parent}", "tracking.enabled=false",
         "train.max_steps=100000", "--resume", str(ckpts)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "error: " in proc.stderr and "mp_rank_00_model_states.pt: its sha256 differs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_documented_command_runs_a_few_steps_on_cpu(tmp_path, corpus_dir):
    """Exactly what users type, `deepspeed launchers/pretrain.py --ds_config ds_configs/zero2.json`
    (on CPU DeepSpeed starts one rank per NUMA node), to the end: steps, export, summary line."""
    out = tmp_path / "run"
    proc = subprocess.run(
        ["deepspeed", "--master_port", str(free_port()), "launchers/pretrain.py", "--ds_config",
         "ds_configs/zero2.json", "--config", "tiny-liu",
         f"data.path={corpus_dir}", f"train.output_dir={out}", "train.max_steps=3", "tracking.enabled=false"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "step 3/3, val loss" in log and (out / "export" / "pipeline.json").is_file()
    assert sum("no GPU: running this DeepSpeed config on CPU" in line for line in log.splitlines()) >= 1


def test_plain_python_runs_one_rank(tmp_path, corpus_dir):
    """`python launchers/pretrain.py` without the deepspeed launcher trains as one rank (before,
    DeepSpeed fell back to MPI discovery and died on a missing mpi4py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/zero2_cpu.json", "--config", "tiny-h1",
         f"data.path={corpus_dir}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.export=false",
         "tracking.enabled=false"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "step 2/2" in proc.stdout
