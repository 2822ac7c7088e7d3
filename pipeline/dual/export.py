"""The export format of DESIGN.md §3: a self-contained model directory.

    DIR/pipeline.json         variant, n_latents, n_ahead, coprocessor_input, family,
                              eos_id, the full dual config and the run config
    DIR/base/                 Hugging Face directory (config.json + model.safetensors)
    DIR/coprocessor/          the same, where the variant has one (LoRA merged)
    DIR/latents.safetensors   {"soft_tokens": (N_L, d)} where the variant has slots, and
                              "latent_code": (V, d) with latent_readout=vocab

`transformers.AutoModelForCausalLM` loads `base/` and `coprocessor/` as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import from_dict, to_dict
from pipeline.dual.config import DualConfig
from pipeline.dual.lora import merge_lora
from pipeline.dual.model import DualModel
from pipeline.errors import PipelineError
from pipeline.models import from_pretrained

FORMAT_VERSION = 1


def export_dual(dual: DualModel, path: str | Path, *, run_config: dict[str, Any] | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Write `dual` to `path` (created; must not hold another export)."""
    path = Path(path)
    if (path / "pipeline.json").exists():
        raise PipelineError(f"{path} already holds an export; choose a new directory or delete it")
    path.mkdir(parents=True, exist_ok=True)
    cfg = dual.config
    dual.base.save_pretrained(path / "base", dtype=dtype)
    if dual.coprocessor is not None:
        cop = copy.deepcopy(dual.coprocessor)
        merge_lora(cop)
        cop.save_pretrained(path / "coprocessor", dtype=dtype)
    if dual.soft_tokens is not None:
        tensors = {"soft_tokens": dual.soft_tokens.weight.detach().expand(cfg.n_latents, -1)}  # pause: repeated
        if dual.latent_code is not None:
            tensors["latent_code"] = dual.latent_code.weight.detach().T
        save_file({k: (v if dtype is None else v.to(dtype)).contiguous().cpu() for k, v in tensors.items()},
                  str(path / "latents.safetensors"))
    meta = {
        "format_version": FORMAT_VERSION,
        "variant": cfg.variant,
        "n_latents": cfg.n_latents,
        "n_ahead": cfg.n_ahead,
        "coprocessor_input": cfg.coprocessor_input,
        "decode_reread": cfg.reread,
        "family": dual.base.config.family,
        "eos_id": dual.eos_id,
        "dual": to_dict(cfg),
        "run_config": run_config or {},
    }
    (path / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_pipeline_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "pipeline.json"
    if not file.is_file():
        raise PipelineError(f"{path}: no pipeline.json; expected a directory written by launchers/export.py")
    meta = json.loads(file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise PipelineError(f"{file}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return meta


def load_dual(path: str | Path, *, device: str | torch.device = "cpu") -> DualModel:
    """Read an export back into a `DualModel` (LoRA arrives merged: adapter = full)."""
    path = Path(path)
    meta = read_pipeline_json(path)
    cfg = dataclasses.replace(from_dict(DualConfig, meta["dual"], where="pipeline.json:dual"),
                              coprocessor_adapter="full")
    base = from_pretrained(path / "base").to(device)
    cop = from_pretrained(path / "coprocessor").to(device) if cfg.spec.has_coprocessor else None
    soft = code = None
    if cfg.spec.augments:
        file = path / "latents.safetensors"
        if not file.is_file():
            raise PipelineError(f"{file} is missing; variant {cfg.variant!r} needs its slot embeddings")
        tensors = load_file(str(file))
        if "soft_tokens" not in tensors:
            raise PipelineError(f"{file} has no tensor 'soft_tokens' (found: {', '.join(tensors)})")
        soft = tensors["soft_tokens"].float()
        if cfg.latent_readout == "vocab":
            if "latent_code" not in tensors:
                raise PipelineError(f"{file} has no tensor 'latent_code', which latent_readout=vocab needs")
            code = tensors["latent_code"].float()
    dual = DualModel(base, cfg, coprocessor=cop, soft_tokens=soft, latent_code=code, eos_id=meta.get("eos_id"))
    return dual.to(device).eval()
