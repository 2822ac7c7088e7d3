"""Llama / Qwen2 / Qwen3: RoPE, RMSNorm, SwiGLU, grouped-query attention.

The variants differ in flags only (`ModelConfig`): Qwen2 has a q/k/v bias,
Qwen3 an RMSNorm over each head's q and k before RoPE, and either may tie the
head to the embedding. Parameter names are the Hugging Face ones
(`model.layers.0.self_attn.q_proj.weight`, ...), so loading is a plain copy.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.attention import AttentionPattern
from pipeline.models.base import CausalLM
from pipeline.models.config import ModelConfig
from pipeline.models.layers import KV, RMSNorm, SwiGLU, apply_rope, attend_with_prefix, rope_cos_sin

Rope = tuple[Tensor, Tensor]  # cos, sin (B, 1, T, hs)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_dim, config.d_model, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, rope: Rope, prefix: KV | None, pattern: AttentionPattern) -> tuple[Tensor, KV]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), *rope)  # (B, nh, T, hs)
        k = apply_rope(k.transpose(1, 2), *rope)  # (B, nkv, T, hs)
        y, kv = attend_with_prefix(q, k, v, prefix, pattern)  # (B, T, nh*hs)
        return self.o_proj(y), kv


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff, config.mlp_bias)

    def forward(self, x: Tensor, rope: Rope, prefix: KV | None, pattern: AttentionPattern) -> tuple[Tensor, KV]:
        a, kv = self.self_attn(self.input_layernorm(x), rope, prefix, pattern)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class LlamaLM(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.d_model),
                layers=nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer)),
                norm=RMSNorm(config.d_model, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def _positions(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Rope]:
        cfg = self.config
        return x, rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
