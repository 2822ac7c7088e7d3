"""`CausalLM`: the forward both families share, and its output type.

A family (gpt2.py, llama.py) supplies the embedding, how positions enter
(`_positions`), the blocks, the final norm and the head; this class runs them:

    x = embed(input_ids) or inputs_embeds                  # (B, T, d)
    for each layer: x, (k, v) = block(x, pos, prefix_kv[l], pattern)
    h = final_norm(x); logits = lm_head(h)                 # (B, T, V)

The attention pattern defaults to causal over [prefix ; own tokens] (SDPA's
`is_causal` fast path when there is no prefix). Model code knows nothing about
DeepSpeed or devices beyond the tensors it is given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.attention import AttentionPattern, causal
from pipeline.errors import PipelineError
from pipeline.models import hf
from pipeline.models.config import ModelConfig
from pipeline.models.layers import KV


@dataclasses.dataclass
class ModelOutput:
    logits: Tensor | None
    """`(B, T, vocab)`, or None with `return_logits=False`."""
    hidden_states: Tensor
    """`(B, T, d)` after the final norm."""
    kv: list[KV] | None
    """Per layer (k, v) of this pass's own tokens, `(B, n_kv_head, T, head_dim)`, post-RoPE;
    None unless `return_kv=True`. Feed it back as `prefix_kv` of a later pass."""


class CausalLM(nn.Module):
    """Decoder-only LM; subclasses build the modules with Hugging Face parameter names."""

    config: ModelConfig
    lm_head: nn.Linear

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        """Recompute each block in backward (saves activation memory)."""

    # family hooks -------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def _positions(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        """Add what positions contribute to x; return (x, per-block position data)."""
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Point the head at the input embedding when the config ties them."""
        raise NotImplementedError

    # forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        prefix_kv: list[KV] | None = None,
        attention: AttentionPattern | None = None,
        return_kv: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Run the model on `input_ids` `(B, T)` or `inputs_embeds` `(B, T, d)`.

        position_ids: `(B, T)` or `(T,)`; default P..P+T-1 after a prefix of length P.
        prefix_kv: per layer (k, v) `(B, n_kv_head, P, head_dim)`, already position-encoded,
            put before this pass's own keys (layer l reads prefix_kv[l]).
        attention: the mask over [prefix ; own] keys; default causal(T, P + T).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise PipelineError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds  # (B, T, d)
        b, t = x.shape[:2]
        p = 0
        if prefix_kv is not None:
            if len(prefix_kv) != self.config.n_layer:
                raise PipelineError(f"prefix_kv has {len(prefix_kv)} layers, the model {self.config.n_layer}")
            p = prefix_kv[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(p, p + t, device=x.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids.expand(b, t)
        if attention is None:
            attention = causal(t, p + t)
        attention.prepare(x.device, x.dtype)  # compile the mask once, outside checkpointed regions

        x, pos = self._positions(x, position_ids)
        kvs: list[KV] = []
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            prefix = prefix_kv[i] if prefix_kv is not None else None
            if recompute:
                x, kv = checkpoint(block, x, pos, prefix, attention, use_reentrant=False)
            else:
                x, kv = block(x, pos, prefix, attention)
            if return_kv:
                kvs.append(kv)
        h = self.final_norm(x)
        logits = self.lm_head(h) if return_logits else None
        return ModelOutput(logits=logits, hidden_states=h, kv=kvs if return_kv else None)

    # init, sizes, saving --------------------------------------------------------------------
    def init_weights(self) -> None:
        """Normal(0, init_std) matrices and embeddings, zero biases, unit norms."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
                nn.init.ones_(module.weight)  # LayerNorm / RMSNorm
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.tie_weights()

    def num_params(self, *, matmul_only: bool = False) -> int:
        """Parameter count; `matmul_only` leaves out lookup tables (position, untied input embeddings)."""
        params = {id(p): p for p in self.parameters()}
        if matmul_only:
            for emb in self.modules():
                if isinstance(emb, nn.Embedding) and emb.weight is not self.lm_head.weight:
                    params.pop(id(emb.weight), None)
        return sum(p.numel() for p in params.values())

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face directory (config.json + model.safetensors) that transformers loads."""
        hf.save_pretrained(self, path, dtype=dtype)
