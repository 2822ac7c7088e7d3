"""The `ltm` task through the generic DeepSpeed loop (ZeRO-2, 2 gloo ranks): exact resume, the
export round-trip, ZeRO-3 against ZeRO-2; and the micro end-to-end run through the launchers (train, export,
`evaluate.py ltm-ppl`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # conftest importable by the spawned ranks

from pipeline.train.testing import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.seq_len=32", "inference.steps=2", "train.eval_every=2", "train.eval_sequences=4",
         "tracking.enabled=false", "model.overrides.max_position_embeddings=64", "model.overrides.window=8"]


def _task(data: Path, out: Path, *extra: str):
    from pipeline.train.configs import load_task

    return load_task("ltm-tiny", [f"data.path={data}", f"train.output_dir={out}", "train.max_steps=4", *SMALL, *extra])


def _rows(run: Path) -> dict[int, dict]:
    """metrics.jsonl's step rows by step (a resumed run appends; the last row of a step wins)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "lr" in r}


def resume_checks(data: Path, out: Path) -> dict:
    """On each of 2 ranks: a straight 4-step run, and 2 steps + stop + resume to 4."""
    from conftest import cpu_ds

    from pipeline.train.trainer import train

    ds = cpu_ds(train_micro_batch_size_per_gpu=2)
    straight = train(_task(data, out / "straight"), ds)
    split_task = _task(data, out / "split", "train.stop_after_steps=2")
    first = train(split_task, ds, resume="auto")
    second = train(_task(data, out / "split"), ds, resume="auto")
    zero3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())  # bf16 -> fp32 on CPU
    zero3["train_micro_batch_size_per_gpu"] = 2
    train(_task(data, out / "zero3", "train.max_steps=2", "train.export=false"), zero3)

    def weights(res):
        return {k: v.detach().numpy().copy() for k, v in res.engine.module.state_dict().items()}

    return {"straight": weights(straight), "split": weights(second), "first": (first.step, first.finished),
            "second": (second.step, second.finished), "export": str(straight.export_dir)}


@pytest.fixture(scope="module")
def resumed(ltm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ltm_runs")
    return run_distributed(resume_checks, ltm_data, out, world_size=2), out


@pytest.mark.slow
def test_ltm_resumes_exactly(resumed):
    (r0, r1), out = resumed
    assert r0["first"] == (2, False) and r0["second"] == (4, True)
    straight, split = _rows(out / "straight"), _rows(out / "split")
    assert sorted(straight) == sorted(split) == [1, 2, 3, 4]
    for step in straight:  # the inner loop's noise and the data are functions of the step: identical numbers
        for key in ("loss", "kl", "recon_nll", "inner_elbo_first", "inner_elbo_last"):
            assert split[step][key] == straight[step][key], (step, key)
    for name, w in r0["straight"].items():
        np.testing.assert_array_equal(r0["split"][name], w)
        np.testing.assert_array_equal(r1["straight"][name], w)  # ranks hold one replica
    row = straight[4]
    assert row["trflops_per_token"] > 0 and row["tokens_per_s"] > 0 and "val_loss" in row
    assert row["loss"] == pytest.approx(row["recon_nll"] + row["kl"], rel=1e-5)
    assert row["elbo"] == -row["loss"] and row["inner_elbo_first"] < 0
    assert row["val_ppl_bound"] == pytest.approx(np.exp(row["val_loss"]), rel=1e-6)


def test_zero3_trains_the_same_numbers(resumed):
    """Partitioned parameters: the inner loop's forward/backward on the bare module still sees
    whole weights (ZeRO-3's gather hooks live on the modules), and the steps match ZeRO-2's."""
    out = resumed[1]
    zero2, zero3 = _rows(out / "straight"), _rows(out / "zero3")
    for step in (1, 2):
        for key in ("loss", "inner_elbo_last"):
            assert zero3[step][key] == pytest.approx(zero2[step][key], rel=1e-5), (step, key)


def test_ltm_export_round_trips(resumed):
    from pipeline.ltm import load_ltm

    (r0, _), out = resumed
    decoder, info = load_ltm(r0["export"])
    state = decoder.state_dict()
    for name, w in r0["straight"].items():
        np.testing.assert_array_equal(state[name].numpy(), w)
    assert info["kind"] == "ltm" and info["inference"].steps == 2 and info["seq_len"] == 32
    assert info["tokenizer"]["vocab_size"] == decoder.config.vocab_size
    record = json.loads((out / "straight" / "checkpoints" / "step4" / "task.json").read_text())
    assert record["kind"] == "ltm" and record["meta"]["data"]["vocab_size"] == decoder.config.vocab_size
    assert not list(Path(r0["export"]).glob("*.pt")) and not list(Path(r0["export"]).glob("*.bin"))


@pytest.mark.slow
def test_micro_end_to_end_through_the_launchers(ltm_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/zero2_cpu.json",
                            "--config", "ltm-tiny", f"data.path={ltm_data}", f"train.output_dir={run}",
                            "train.max_steps=2", *SMALL], cwd=ROOT, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "exported to" in train.stdout
    ev = subprocess.run([sys.executable, "launchers/evaluate.py", "ltm-ppl", "--model", str(run / "export"),
                         "--steps", "0,3", "--sequences", "4", "--out", str(tmp_path / "eval")],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "ltm_ppl.json").read_text())
    sweep = res["models"][str(run / "export")]["sweep"]
    assert [r["steps"] for r in sweep] == [0, 3] and res["sequences"] == 4 and res["seq_len"] == 32
    assert sweep[0]["kl_per_token"] > sweep[1]["kl_per_token"] > 0  # log sigma^2 climbs from -5
    for r in sweep:
        assert r["ppl_bound"] == pytest.approx(np.exp(r["neg_elbo_per_token"]))
        assert r["ppl_bound"] >= r["recon_ppl"]
    assert "<= " in ev.stdout
    gen = subprocess.run([sys.executable, "launchers/evaluate.py", "ltm-generate", "--model", str(run / "export"),
                          "--prompt", "Copy 3.", "--steps", "2", "--max-new-tokens", "4",
                          "--tokenizer", str(ltm_data.parent / "spm.model")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert gen.returncode == 0 and gen.stdout.startswith("Copy 3."), gen.stderr[-2000:]
    bad = subprocess.run([sys.executable, "launchers/evaluate.py", "ltm-ppl", "--model", str(run / "export"),
                          "--steps", "0,x", "--out", str(tmp_path / "eval")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --steps")


def test_generation_from_an_inferred_z(ltm_data):
    from pipeline.ltm import LTMDecoder, ltm_preset
    from pipeline.ltm.evaluate import generate
    from pipeline.ltm.inference import InferenceConfig

    torch.manual_seed(0)
    dec = LTMDecoder(ltm_preset("ltm-tiny", vocab_size=50))
    prompt = torch.randint(0, 50, (7,))
    cfg = InferenceConfig(steps=2)
    greedy, post = generate(dec, prompt, cfg, steps=2, max_new_tokens=5)
    again, _ = generate(dec, prompt, cfg, steps=2, max_new_tokens=5)
    assert torch.equal(greedy, again) and torch.equal(greedy[:7], prompt) and len(greedy) == 12
    assert post.mu.shape == (1, *dec.config.latent_shape)
    s1, _ = generate(dec, prompt, cfg, steps=2, max_new_tokens=5, temperature=1.0, seed=3)
    s2, _ = generate(dec, prompt, cfg, steps=2, max_new_tokens=5, temperature=1.0, seed=3)
    assert torch.equal(s1, s2)
