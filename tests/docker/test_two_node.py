"""Two nodes, one rank each, through `docker/launch_nossh.sh` on this host (no containers):
DeepSpeed's `--no_ssh` mode with node ranks 0 and 1 meeting at 127.0.0.1 trains a tiny
preset under ZeRO-2; both nodes finish and the checkpoint holds both ranks' partitions.
The same launch in two containers is `docker/smoke_test.sh`'s check 3."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.train.testing import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data, gpt2_tokenizer_dir) -> Path:
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("two_node_data")
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:80]]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["question"] + "\n" + r["answer"]}) + "\n" for r in rows))
    out = root / "shards"
    assert main(["build", "--input", str(corpus), "--tokenizer", str(gpt2_tokenizer_dir), "--output", str(out),
                 "--val-fraction", "0.2", "--workers", "1"]) in (0, None)
    return out


def test_two_nodes_no_ssh_train_and_checkpoint(shards, tmp_path):
    port, out = free_port(), tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        cmd = ["bash", "docker/launch_nossh.sh", "--num_nodes", "2", "--node_rank", str(rank), "--gpus_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port), "--ds_config", "ds_configs/zero2_cpu.json",
               "--", "--config", "tiny-liu", f"data.path={shards}", "data.seq_len=64", "dual.n_sites=4",
               "train.max_steps=3", "train.log_every=1", "train.eval_every=1000", f"train.output_dir={out}",
               "tracking.enabled=false"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-node job did not finish in 420 s")
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"node {rank} failed:\n{log[-3000:]}"
    assert any("dist_world_size=2" in log for log in logs), "the nodes did not form one 2-rank job"
    step = out / "checkpoints" / "step3"
    assert (step / "complete.json").is_file()  # written by rank 0 after both ranks saved
    assert {p.name for p in step.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert (out / "export" / "pipeline.json").is_file()
