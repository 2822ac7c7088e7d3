"""GPT-2 and Llama/Qwen-family decoders with prefix K/V, one mask rule, and HF round-trip.

    from pipeline.models import from_pretrained, preset, build_model, generate
    model = from_pretrained("path/to/hf_dir")        # GPT-2, Llama, Qwen2, Qwen3 (safetensors)
    out = model(input_ids=ids)                       # ModelOutput: .logits, .hidden_states, .kv
    model.save_pretrained("out_dir")                 # transformers.AutoModelForCausalLM loads it
    model = build_model(preset("qwen3-tiny"))        # random init from a preset
"""

from pipeline.models.base import CausalLM, ModelOutput
from pipeline.models.config import PRESETS, ModelConfig, preset
from pipeline.models.generate import generate
from pipeline.models.hf import load_weights, save_pretrained
from pipeline.models.layers import KV
from pipeline.models.registry import build_model, from_pretrained

__all__ = [
    "KV",
    "PRESETS",
    "CausalLM",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "from_pretrained",
    "generate",
    "load_weights",
    "preset",
    "save_pretrained",
]
