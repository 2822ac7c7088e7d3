"""A build killed at any moment and run again ends with the same bytes; no half shard passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.cli import main
from pipeline.data import build as build_mod
from pipeline.data import shards
from pipeline.errors import PipelineError


def done_shards(out: Path) -> int:
    try:
        return len(json.loads((out / build_mod.STATE).read_text())["shards"])
    except (OSError, ValueError):
        return 0


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gsm8k, gpt2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("restart")
    corpus = tmp / "gsm8k.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in gsm8k * 2))
    args = ["build", "--input", str(corpus), "--tokenizer", str(gpt2_tokenizer_dir),
            "--val-fraction", "0.05", "--shard-size", "32K"]
    assert main([*args, "--output", str(tmp / "ref")]) == 0
    return args, shard_bytes(tmp / "ref"), json.loads((tmp / "ref" / "manifest.json").read_text())


class Crash(Exception):
    pass


@pytest.mark.parametrize("after", [0, 1, 2, 5, 12])
def test_crash_at_each_rename_then_rerun(setup, tmp_path, monkeypatch, after):
    """Crash at the `after`-th rename (shard .bin, .idx, state file...), then finish."""
    args, ref, ref_manifest = setup
    real, calls = os.replace, [0]

    def flaky(src, dst):
        calls[0] += 1
        if calls[0] > after:
            raise Crash(f"crash before renaming {src}")
        real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(Crash):
        build_mod.build(build_mod.BuildOptions(
            inputs=[args[2]], tokenizer=args[4], output=str(tmp_path / "out"), val_fraction=0.05,
            shard_size=32 << 10, batch_bytes=64 << 10))
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(PipelineError, match="unfinished"):
        shards.verify_dataset(tmp_path / "out")
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    assert shard_bytes(tmp_path / "out") == ref
    got = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert got["shards"] == ref_manifest["shards"] and got["totals"] == ref_manifest["totals"]
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_sigkill_mid_build_then_rerun(setup, tmp_path):
    """A real SIGKILL once some shards are complete (and another at start-up)."""
    args, ref, _ = setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", *args, "--output", str(out), "--workers", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for wait_for_shard in (False, True):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if not wait_for_shard and time.time() > deadline - 59.5:
                break
            if wait_for_shard and done_shards(out) >= 2:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / shards.MANIFEST).exists()
        assert main(["verify", str(out)]) == 2
    assert done_shards(out) >= 2  # some work to resume
    assert main([*args, "--output", str(out)]) == 0
    assert shard_bytes(out) == ref
    assert not list(out.rglob("*.tmp"))
