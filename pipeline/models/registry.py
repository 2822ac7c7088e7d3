"""The model families by name, and loading a Hugging Face directory into the right one.

`config.family` selects the class (`FAMILIES`); `from_pretrained` reads the
directory's config.json, builds that family on the meta device (no init work)
and fills it through `pipeline.models.hf`. This module sits above the family
modules and `hf.py`, so `base.py` and `hf.py` need not know the families exist.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.models.base import CausalLM
from pipeline.models.config import ModelConfig
from pipeline.models.gpt2 import GPT2LM
from pipeline.models.hf import load_weights, read_config
from pipeline.models.llama import LlamaLM

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[CausalLM]] = {"gpt2": GPT2LM, "llama": LlamaLM}
"""`ModelConfig.family` -> the class that builds it (Qwen2/Qwen3 are `llama` rows of config)."""


def build_model(config: ModelConfig) -> CausalLM:
    """A freshly initialised model of `config.family`."""
    return FAMILIES[config.family](config)


def from_pretrained(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Load a `transformers` checkpoint directory of either family (GPT-2, Llama, Qwen2, Qwen3)."""
    config = read_config(path)
    with torch.device("meta"):
        model = build_model(config)  # no init work: every tensor is overwritten below
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, path)
    log.info("loaded %s (%s, %.1fM params) from %s", config.hf_model_type, config.family,
             model.num_params() / 1e6, path)
    return model.to(dtype)
