"""Hugging Face interop: read and write `transformers` checkpoint directories (safetensors only).

A directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Our parameter names are the HF ones, with two
differences handled here: GPT-2's Conv1D matrices are stored `(in, out)` by HF
and `(out, in)` by us, and a tied head is not written (HF re-ties it on load).
Pickled checkpoints (`pytorch_model.bin`) are never read.

This module knows no model class: a model here is any `torch.nn.Module` that
carries `.config: ModelConfig` and `.tie_weights()` (every `CausalLM` does).
Choosing the class for a config, and so `from_pretrained`, live in
`pipeline.models.registry`, which keeps the imports one-way
(registry -> families -> base -> hf).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.models.config import HF_TYPES, ModelConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""GPT-2 matrices HF keeps as Conv1D `(in, out)`."""
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
"""Buffers some old checkpoints carry; they hold no weights."""


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory, from its config.json."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise PipelineError(f"{path}: no config.json; expected a Hugging Face model directory")
    return ModelConfig.from_hf(json.loads(file.read_text()), where=str(file))


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (single file or sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise PipelineError(f"{index}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: pickled weights are not loaded; convert to safetensors)" if pickles else ""
        raise PipelineError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise PipelineError(f"{index}: shard {name} is missing")
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _to_ours(config: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF names/layout -> our state-dict names/layout."""
    out = {}
    for name, tensor in hf.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if config.family == "gpt2":
            if name.startswith(("wte.", "wpe.", "h.", "ln_f.")):
                name = "transformer." + name  # GPT2Model checkpoints (e.g. the public gpt2) lack it
            if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2:
                tensor = tensor.t()
        out[name] = tensor
    return out


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy a checkpoint directory's tensors into `model`, checking names, shapes and family."""
    path = Path(path)
    if (path / "config.json").is_file():
        theirs = json.loads((path / "config.json").read_text()).get("model_type")
        ours = model.config.family
        if HF_TYPES.get(theirs) != ours:
            raise PipelineError(f"{path}: checkpoint model_type {theirs!r} does not fit a {ours} model")
    load_state(model, _to_ours(model.config, read_safetensors(path)), where=str(path))


def load_state(model: nn.Module, tensors: dict[str, Tensor], *, where: str = "checkpoint") -> None:
    """Strictly copy `tensors` (our names) into `model`; any mismatch names the tensor."""
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
        head = tensors.pop("lm_head.weight", None)
        if head is not None:  # some tied checkpoints store the head anyway
            emb = next((v for k, v in tensors.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None)
            if emb is not None and not torch.equal(head, emb):
                raise PipelineError(f"{where}: tensor 'lm_head.weight' differs from the embedding, "
                                    "but the config ties them (tie_word_embeddings)")
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(repr(n) for n in missing[:5])}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(repr(n) for n in unexpected[:5])}")
        raise PipelineError(
            f"{where}: {'; '.join(parts)} for a {model.config.hf_model_type} model "
            "(wrong family or config for these weights?)"
        )
    for name in expected:  # model order: the first mismatching tensor is named
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise PipelineError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)} (config.json does not match the weights?)"
            )
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in tensors:
                param.copy_(tensors[name])
    model.tie_weights()


def save_pretrained(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the HF layout (loadable by transformers)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if config.family == "gpt2" and name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        tensors[name] = tensor
    hf = config.to_hf()
    first = next(iter(tensors.values()))
    hf["torch_dtype"] = hf["dtype"] = str(first.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
