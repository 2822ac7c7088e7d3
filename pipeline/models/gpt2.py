"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused qkv, GELU MLP, tied head.

Parameter names are the Hugging Face ones (`transformer.h.0.attn.c_attn.weight`, ...),
but stored as `nn.Linear` `(out, in)`; HF's Conv1D keeps `(in, out)`, so hf.py
transposes those four matrices on load and save.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pipeline.attention import AttentionPattern
from pipeline.models.base import CausalLM
from pipeline.models.config import ModelConfig
from pipeline.models.layers import KV, GeluMLP, attend_with_prefix


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, prefix: KV | None, pattern: AttentionPattern) -> tuple[Tensor, KV]:
        b, t, d = x.shape
        # (B, T, 3d) -> 3 x (B, nh, T, hs)
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        y, kv = attend_with_prefix(q, k, v, prefix, pattern)  # (B, T, d)
        return self.c_proj(y), kv


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = GeluMLP(config.d_model, config.d_ff)

    def forward(self, x: Tensor, pos: Any, prefix: KV | None, pattern: AttentionPattern) -> tuple[Tensor, KV]:
        a, kv = self.attn(self.ln_1(x), prefix, pattern)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT2LM(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.max_position_embeddings, config.d_model),
                h=nn.ModuleList(GPT2Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.d_model, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        # residual projections scaled by depth (GPT-2 paper, Sec. 2.3)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.data.mul_((2 * self.config.n_layer) ** -0.5)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.wte(input_ids)

    def _positions(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, None]:
        return x + self.transformer.wpe(position_ids), None

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight
