"""Building blocks shared by the families: norms, RoPE, the attention core, MLPs.

Attention here is only the part every family has in common: given per-head
q `(B, nh, T, hs)` and k, v `(B, nkv, T, hs)` for the pass's own tokens, put the
layer's prefix K/V in front, run the mask rule (`pipeline.attention.attend`),
and hand back the own tokens' K/V (post-RoPE), which is what a later pass or
another model reads as its prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.attention import AttentionPattern, attend_after_prefix

KV = tuple[Tensor, Tensor]
"""One layer's keys and values, each `(B, n_kv_head, T, head_dim)`, position-encoded."""


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the Llama/Qwen reference does), weight applied after."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device: torch.device) -> Tensor:
    """Angular frequency of each rotated pair `(hs/2,)`, float32; `scaling` = Llama 3 rescaling."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    # Llama 3.x: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin `(B, 1, T, head_dim)` for RoPE in the rotate-half layout, computed in float32."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)  # (hs/2,)
    freqs = position_ids[:, :, None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + hs/2) of x `(B, n, T, hs)` by the position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend_with_prefix(
    q: Tensor, k: Tensor, v: Tensor, prefix: KV | None, pattern: AttentionPattern
) -> tuple[Tensor, KV]:
    """Attention of q over [prefix ; own] keys. Returns out `(B, T, nh*hs)` and the own (k, v)."""
    y = attend_after_prefix(q, k, v, prefix, pattern)  # (B, nh, T, hs)
    b, nh, t, hs = y.shape
    return y.transpose(1, 2).reshape(b, t, nh * hs), (k, v)


class GeluMLP(nn.Module):
    """GPT-2 MLP: c_fc -> GELU (tanh approximation, HF "gelu_new") -> c_proj."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
