"""The issue-13 experiment scripts keep measuring what they claim to (scripts/experiments/).

They subclass DualModel to put their own latents in the slots; when the model's forward
stopped calling the hook they overrode, their latents were silently unused. These checks
fail in that case.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.dual import DualConfig

from .conftest import EOS, tiny_base

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_free_latents_reach_the_loss(shard_dir, exports):
    """latent_capacity: per-site latents optimized against the answer must lower the ahead NLL."""
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "latent_capacity.py"), "--base", str(exports["hf_base"]), "--data",
         str(shard_dir), "--sequences", "4", "--seq", "48", "--m", "2", "--steps", "30"],
        capture_output=True, text=True, check=True, env={"THREADS": "1", **_env()},
    )
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    base, free = sum(result["base_nll_per_k"]), sum(result["free_nll_per_k"])
    assert free < base - 0.1, (base, free)


def test_sweep_latent_map_changes_what_the_base_reads():
    """liu_sweep: --latent-map must change the loss of the same model on the same batch."""
    sweep = _load("liu_sweep")
    torch.manual_seed(0)
    cfg = DualConfig(variant="liu", n_latents=2, n_ahead=2, n_sites=2, decode_reread=True)
    dual = sweep.MappedLatents(tiny_base(), cfg, eos_id=EOS)
    ids = torch.randint(0, 1000, (2, 24))
    sites = dual.sample_sites(ids, torch.Generator().manual_seed(0))
    losses = {}
    for latent_map in ("none", "norm", "mixture"):
        sweep.MappedLatents.latent_map = latent_map
        with torch.no_grad():
            losses[latent_map] = float(dual(ids, sites).loss)
    sweep.MappedLatents.latent_map = "none"
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "THREADS"}
