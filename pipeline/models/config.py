"""`ModelConfig`: one typed config for both families, with HF `config.json` conversion and presets.

`family` picks the architecture: `gpt2` (learned positions, LayerNorm, GELU MLP,
tied head) or `llama` (RoPE, RMSNorm, SwiGLU, grouped-query attention; Llama,
Qwen2 and Qwen3 differ only in flags: qkv bias, q/k-norm, tied head).
`hf_model_type` remembers which `transformers` class a checkpoint is written as.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pipeline.errors import PipelineError

HF_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "qwen3": "llama"}
"""HF `model_type` -> our family."""
HF_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass
class ModelConfig:
    family: Literal["gpt2", "llama"]
    """Architecture family."""
    vocab_size: int
    """Rows of the embedding and of the output head."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Query heads per attention layer."""
    d_model: int
    """Residual stream width (HF `n_embd` / `hidden_size`)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None = n_head. gpt2: must equal n_head."""
    head_dim: int | None = None
    """Width of one head; None = d_model // n_head (Qwen3 sets it explicitly)."""
    d_ff: int | None = None
    """MLP hidden width; None = 4 * d_model (gpt2). Required for llama."""
    max_position_embeddings: int = 1024
    """Longest sequence (gpt2: rows of the position table; llama: informational)."""
    norm_eps: float = 1e-5
    """LayerNorm / RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base (llama family)."""
    rope_scaling: dict[str, float] | None = None
    """Llama 3 RoPE rescaling (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`); None = plain RoPE."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (gpt2 and Qwen2: True)."""
    o_bias: bool = False
    """Bias on the attention output projection (gpt2: True)."""
    mlp_bias: bool = False
    """Bias on the MLP projections (gpt2: True)."""
    tie_word_embeddings: bool = True
    """Output head shares the input embedding matrix (gpt2: always)."""
    hf_model_type: str = ""
    """`model_type` written to config.json ("gpt2", "llama", "qwen2", "qwen3"); "" = family default."""
    bos_token_id: int | None = None
    """Written to config.json; not used by the model."""
    eos_token_id: int | None = None
    """Written to config.json; the default stop token of `generate`."""
    init_std: float = 0.02
    """Std of the normal init of weights when not loading a checkpoint."""

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama"):
            raise PipelineError(f"model family {self.family!r} is not one of 'gpt2', 'llama'")
        if not self.hf_model_type:
            self.hf_model_type = self.family
        if HF_TYPES.get(self.hf_model_type) != self.family:
            raise PipelineError(f"hf_model_type {self.hf_model_type!r} is not a {self.family} type")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise PipelineError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise PipelineError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise PipelineError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.family == "gpt2":
            self.d_ff = self.d_ff or 4 * self.d_model
            bad = [
                f"{name}={getattr(self, name)}"
                for name, want in [("n_kv_head", self.n_head), ("head_dim", self.d_model // self.n_head),
                                   ("qk_norm", False), ("tie_word_embeddings", True)]
                if getattr(self, name) != want
            ]
            if bad:
                raise PipelineError(f"gpt2 does not support {', '.join(bad)}")
            self.qkv_bias = self.o_bias = self.mlp_bias = True
        elif self.d_ff is None:
            raise PipelineError("llama family needs d_ff (HF intermediate_size)")
        if self.rope_scaling is not None:
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if self.family != "llama" or set(self.rope_scaling) != need:
                raise PipelineError(f"rope_scaling must be a llama-family dict with keys {sorted(need)}")
        if self.family == "llama" and self.head_dim % 2:
            raise PipelineError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    # --- Hugging Face config.json ------------------------------------------------------

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict `transformers` reads for this model."""
        common = {
            "architectures": [HF_ARCHITECTURES[self.hf_model_type]],
            "model_type": self.hf_model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
        }
        if self.family == "gpt2":
            return common | {
                "n_positions": self.max_position_embeddings, "n_embd": self.d_model,
                "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": self.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": self.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "initializer_range": self.init_std, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            }
        out = common | {
            "hidden_size": self.d_model, "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps, "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "attention_dropout": 0.0, "initializer_range": self.init_std,
        }
        if self.hf_model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise PipelineError("llama checkpoints have one attention_bias for q/k/v/o")
            out |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        elif self.hf_model_type == "qwen3":
            out |= {"attention_bias": self.qkv_bias, "use_sliding_window": False}
        else:
            out |= {"use_sliding_window": False}
        if self.rope_scaling is not None:
            out["rope_parameters"] = out["rope_scaling"] = {
                "rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling
            }
        return out

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
        """Read a `transformers` config dict (GPT-2, Llama, Qwen2, Qwen3)."""
        model_type = hf.get("model_type")
        if model_type not in HF_TYPES:
            raise PipelineError(
                f"{where}: model_type {model_type!r} is not supported; expected one of {sorted(HF_TYPES)}"
            )
        try:
            if model_type == "gpt2":
                return cls._from_hf_gpt2(hf, where)
            return cls._from_hf_llama(hf, model_type, where)
        except KeyError as exc:
            raise PipelineError(f"{where}: missing key {exc.args[0]!r}") from None

    @classmethod
    def _from_hf_gpt2(cls, hf: dict[str, Any], where: str) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        unsupported = {
            "activation_function": act not in ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
            "reorder_and_upcast_attn": hf.get("reorder_and_upcast_attn", False),
            "scale_attn_weights": not hf.get("scale_attn_weights", True),
            "tie_word_embeddings": not hf.get("tie_word_embeddings", True),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise PipelineError(f"{where}: unsupported GPT-2 setting(s) {', '.join(bad)}")
        return cls(
            family="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            d_model=hf["n_embd"], d_ff=hf.get("n_inner"), max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), hf_model_type="gpt2",
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
            init_std=hf.get("initializer_range", 0.02),
        )

    @classmethod
    def _from_hf_llama(cls, hf: dict[str, Any], model_type: str, where: str) -> ModelConfig:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise PipelineError(f"{where}: rope type {rope_type!r} is not supported ('default', 'llama3')")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {k: rope[k] for k in keys} if rope_type == "llama3" else None
        if hf.get("hidden_act", "silu") != "silu":
            raise PipelineError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window", False):
            raise PipelineError(f"{where}: sliding-window attention is not supported")
        n_head = hf["num_attention_heads"]
        attention_bias = hf.get("attention_bias", False)
        return cls(
            family="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=n_head, d_model=hf["hidden_size"],
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            d_ff=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            qk_norm=model_type == "qwen3",
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=hf.get("mlp_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", model_type != "llama"),
            hf_model_type=model_type, bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first(hf.get("eos_token_id")), init_std=hf.get("initializer_range", 0.02),
        )


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) and x else x


PRESETS: dict[str, dict[str, Any]] = {
    # tiny sizes for tests and CPU smoke runs
    "gpt2-tiny": dict(family="gpt2", vocab_size=256, n_layer=2, n_head=4, d_model=64,
                      max_position_embeddings=128, eos_token_id=0),
    "llama-tiny": dict(family="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       d_ff=128, max_position_embeddings=128, norm_eps=1e-6, tie_word_embeddings=False,
                       hf_model_type="llama", eos_token_id=0),
    "qwen3-tiny": dict(family="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       head_dim=32, d_ff=128, max_position_embeddings=128, norm_eps=1e-6,
                       rope_theta=1_000_000.0, qk_norm=True, hf_model_type="qwen3", eos_token_id=0),
    # the public checkpoints' shapes
    "gpt2-124m": dict(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768,
                      max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256),
    "qwen3-0.6b": dict(family="llama", vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8,
                       d_model=1024, head_dim=128, d_ff=3072, max_position_embeddings=40960,
                       norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True, tie_word_embeddings=True,
                       hf_model_type="qwen3", bos_token_id=151643, eos_token_id=151645),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config (`gpt2-tiny`, `llama-tiny`, `qwen3-tiny`, `gpt2-124m`, `qwen3-0.6b`)."""
    if name not in PRESETS:
        raise PipelineError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**(PRESETS[name] | overrides))
