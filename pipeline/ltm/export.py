"""The LTM export directory: safetensors + JSON only, loadable without the run.

    export/
      model.safetensors    the decoder's weights (a tied head is stored once, as the embedding)
      config.json          LTMModelConfig
      pipeline.json        {"kind": "ltm", "inference": {...}, "seq_len", "tokenizer", "run_config"}

    decoder, info = load_ltm("runs/ltm-tiny/export")    # info: the pipeline.json content
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import from_dict, to_dict
from pipeline.errors import PipelineError
from pipeline.ltm.inference import InferenceConfig
from pipeline.ltm.model import LTMDecoder, LTMModelConfig
from pipeline.train.task import load_checked

KIND = "ltm"


def save_ltm(decoder: LTMDecoder, out_dir: str | Path, *, run_config: dict[str, Any], inference: InferenceConfig,
             tokenizer: dict[str, Any], seq_len: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in decoder.state_dict().items()}
    if decoder.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as embed_tokens.weight (safetensors refuses aliases)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(decoder.config), indent=2))
    info = {"kind": KIND, "inference": to_dict(inference), "seq_len": seq_len, "tokenizer": tokenizer,
            "run_config": run_config}
    (out / "pipeline.json").write_text(json.dumps(info, indent=2))
    return out


def is_ltm_export(path: str | Path) -> bool:
    f = Path(path) / "pipeline.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("kind") == KIND
    except json.JSONDecodeError:
        return False


def load_ltm(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[LTMDecoder, dict[str, Any]]:
    """(decoder in eval mode on `device`, the pipeline.json content with `inference` as an InferenceConfig)."""
    path = Path(path)
    for name in ("model.safetensors", "config.json", "pipeline.json"):
        if not (path / name).is_file():
            raise PipelineError(f"{path}: not an LTM export ({name} is missing)")
    try:
        info = json.loads((path / "pipeline.json").read_text())
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: invalid JSON ({exc})") from None
    if info.get("kind") != KIND:
        raise PipelineError(f"{path}/pipeline.json: kind is {info.get('kind')!r}, not {KIND!r}")
    decoder = LTMDecoder(from_dict(LTMModelConfig, raw, where=f"{path}/config.json"))
    state = load_file(str(path / "model.safetensors"))
    load_checked(decoder, state, f"{path}/model.safetensors (against config.json)",
                 tied=decoder.config.tie_word_embeddings)
    decoder.tie_weights()
    info["inference"] = from_dict(InferenceConfig, info.get("inference", {}), where=f"{path}/pipeline.json: inference")
    return decoder.to(device).eval(), info
