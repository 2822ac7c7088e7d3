"""A Coconut model in the project's export format (DESIGN.md §3), variant `coconut`.

    DIR/pipeline.json          format_version, variant "coconut", n_latents (the final stage's
                               count: what evaluation thinks with), family, eos_id, run config
    DIR/base/                  the LM as a Hugging Face directory (+ tokenizer files, by the task)
    DIR/markers.safetensors    {"bot": (d,), "eot": (d,)}: the two marker input embeddings

`transformers.AutoModelForCausalLM` loads `base/` as it is (the markers live outside the
vocabulary, so the checkpoint is a stock one); `load_coconut` reads the whole back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.coconut.model import BOT, EOT, CoconutLM
from pipeline.dual.export import FORMAT_VERSION, read_pipeline_json
from pipeline.errors import PipelineError
from pipeline.models import from_pretrained

VARIANT = "coconut"
MARKERS_FILE = "markers.safetensors"


def export_coconut(model: CoconutLM, path: str | Path, *, n_latents: int, run_config: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `model` to `path` (created; must not hold another export). `extra`: more
    pipeline.json fields under "coconut" (the curriculum, ...)."""
    path = Path(path)
    if (path / "pipeline.json").exists():
        raise PipelineError(f"{path} already holds an export; choose a new directory or delete it")
    path.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(path / "base")
    markers = model.markers.detach().float().cpu()
    save_file({"bot": markers[BOT].contiguous(), "eot": markers[EOT].contiguous()}, str(path / MARKERS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "variant": VARIANT,
        "n_latents": n_latents,
        "n_ahead": 0,
        "coprocessor_input": None,
        "decode_reread": False,
        "family": model.lm.config.family,
        "eos_id": model.lm.config.eos_token_id,
        "coconut": {"markers": MARKERS_FILE, "thought": "last hidden state (after the final norm) fed back as the "
                    "next input embedding", **(extra or {})},
        "run_config": run_config or {},
    }
    (path / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def is_coconut(meta: dict[str, Any]) -> bool:
    return meta.get("variant") == VARIANT


def load_coconut(path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[CoconutLM, dict[str, Any]]:
    """(the model, its pipeline.json) of an export written by `export_coconut`."""
    path = Path(path)
    meta = read_pipeline_json(path)
    if not is_coconut(meta):
        raise PipelineError(f"{path}: variant {meta.get('variant')!r}, not {VARIANT!r}")
    n = meta.get("n_latents")
    if not isinstance(n, int) or n < 0:
        raise PipelineError(f"{path / 'pipeline.json'}: n_latents must be an integer >= 0, got {n!r}")
    file = path / MARKERS_FILE
    if not file.is_file():
        raise PipelineError(f"{file} is missing; a coconut export needs its <bot>/<eot> embeddings")
    tensors = load_file(str(file))
    missing = {"bot", "eot"} - set(tensors)
    if missing:
        raise PipelineError(f"{file} lacks {', '.join(sorted(missing))} (found: {', '.join(tensors)})")
    lm = from_pretrained(path / "base", device=device)
    model = CoconutLM(lm, torch.stack([tensors["bot"], tensors["eot"]]).to(device))
    return model.to(dtype).eval(), meta
