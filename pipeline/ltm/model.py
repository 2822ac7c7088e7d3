"""The decoder of a Latent Thought Model (paper 003 §2.1, DESIGN.md §4): p(x | z).

    cfg = ltm_preset("ltm-tiny", vocab_size=512, eos_token_id=2)
    dec = LTMDecoder(cfg)
    z = torch.randn(B, cfg.n_layer, cfg.latents_per_layer, cfg.d_model)
    logits = dec(input_ids, z)                   # (B, S, V)
    nll = dec(input_ids, z, targets=input_ids)   # (B,) summed next-token NLL of each sequence

Each block is Llama-shaped (RMSNorm, SwiGLU, RoPE; the project's layers) with one extra
sub-layer between self-attention and the MLP:

    x = x + SelfAttn(norm(x))            sliding-window causal over the last `window` tokens
    x = x + CrossAttn(norm(x), z_l)      queries from the tokens, keys/values from z_l
    x = x + MLP(norm(x))

`z` holds `n_latents` vectors of width d_model split evenly across the layers (layer l
reads its own `latents_per_layer` = n_latents / n_layer vectors; paper: "N_z denotes the
total number"; LTM-Medium's 24 latents over 6 layers are 4 per layer, App. C). z_l is not
normalised before its key/value projections (it is a sample of a N(0, I)-scaled posterior).
Appendix A.1 applies RoPE to the latent vectors too; with `latent_rope` the keys of z_l sit
at positions 0..n_l-1 and the queries at their token positions, otherwise cross-attention
has no position encoding (every token sees z_l the same way).

The self-attention mask is `pipeline.attention.sliding_window_causal`, so it runs as a
FlexAttention BlockMask on GPU and a dense SDPA mask on CPU like every other pattern.
The model knows nothing about DeepSpeed or the inner loop (`pipeline.ltm.inference`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.attention import AttentionPattern, attend, sliding_window_causal
from pipeline.errors import PipelineError
from pipeline.models.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin

Rope = tuple[Tensor, Tensor]


@dataclasses.dataclass
class LTMModelConfig:
    """Sizes of an LTM decoder (a preset plus overrides, checked here)."""

    vocab_size: int = 512
    """Token ids; follows the data's tokenizer when built for a dataset."""
    d_model: int = 64
    """Hidden width H; the latent vectors have the same width (paper App. A.1)."""
    n_layer: int = 2
    n_head: int = 4
    d_ff: int = 160
    """SwiGLU inner width."""
    n_latents: int = 8
    """N_z: latent thought vectors in total, split evenly over the layers."""
    window: int = 32
    """k: keys each token's self-attention sees, its own included (paper: 256)."""
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    latent_rope: bool = True
    """Rotate cross-attention queries by token position and z_l's keys by their index (App. A.1)."""
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    """Head = input embedding (the 38M of LTM-Small counts the 50k x 512 table once)."""
    eos_token_id: int | None = None
    attention_backend: str = "auto"
    """"auto" (FlexAttention on CUDA, SDPA elsewhere), "flex" or "sdpa"."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "n_latents", "window"):
            if getattr(self, name) < 1:
                raise PipelineError(f"ltm model: {name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise PipelineError(f"ltm model: d_model={self.d_model} must split into {self.n_head} heads of "
                                "even width (RoPE rotates pairs)")
        if self.n_latents % self.n_layer:
            raise PipelineError(f"ltm model: n_latents={self.n_latents} must be a multiple of n_layer="
                                f"{self.n_layer} (each layer reads its own equal share)")
        if self.attention_backend not in ("auto", "flex", "sdpa"):
            raise PipelineError(f"ltm model: attention_backend={self.attention_backend!r} is not auto/flex/sdpa")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def latents_per_layer(self) -> int:
        return self.n_latents // self.n_layer

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape of one sequence's z: (L, N_z / L, d)."""
        return (self.n_layer, self.latents_per_layer, self.d_model)


# Paper 003 App. A.1 / Table 1: d = 512, 8 heads, window 256, sequences of 1024, GPT-2 tokens
# (+1 EOS). d_ff = 1368 (≈ 8/3 d, the SwiGLU width of the same cost as a 4d GELU MLP) with a
# tied head gives 38.3M (Small, 3 layers) and 50.9M (Medium, 6 layers) parameters, the paper's
# 38M and 51M; N_z = 24 in Table 1 (8 per layer for Small, 4 for Medium).
_PAPER = dict(vocab_size=50258, d_model=512, n_head=8, d_ff=1368, n_latents=24, window=256,
              max_position_embeddings=1024)
PRESETS: dict[str, dict] = {
    "ltm-tiny": dict(vocab_size=512, d_model=64, n_layer=2, n_head=4, d_ff=160, n_latents=8, window=32,
                     max_position_embeddings=256),
    "ltm-small": dict(_PAPER, n_layer=3),
    "ltm-medium": dict(_PAPER, n_layer=6),
}


def ltm_preset(name: str, **overrides) -> LTMModelConfig:
    if name not in PRESETS:
        raise PipelineError(f"unknown LTM model preset {name!r}; known: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LTMModelConfig)})
    if unknown:
        raise PipelineError(f"model.overrides.{unknown[0]}: not an LTM model field")
    return LTMModelConfig(**(PRESETS[name] | overrides))


class Attention(nn.Module):
    """Multi-head attention; self-attention (keys from x) or cross-attention (keys from z)."""

    def __init__(self, cfg: LTMModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: Tensor, source: Tensor, pattern: AttentionPattern, q_rope: Rope | None,
                k_rope: Rope | None) -> Tensor:
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        if q_rope is not None:
            q, k = apply_rope(q, *q_rope), apply_rope(k, *k_rope)
        y = attend(q, k, v, pattern)  # (B, nh, T, hs)
        b, nh, t, hs = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, nh * hs))


class LTMBlock(nn.Module):
    def __init__(self, cfg: LTMModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, bias=False)

    def forward(self, x: Tensor, z_l: Tensor, rope: Rope, z_rope: Rope | None, self_mask: AttentionPattern,
                cross_mask: AttentionPattern) -> Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, h, self_mask, rope, rope)
        x = x + self.cross_attn(self.cross_layernorm(x), z_l, cross_mask, rope if z_rope else None, z_rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LTMDecoder(nn.Module):
    """p(x | z): token embedding, L blocks each reading its z_l, final norm, (tied) head."""

    def __init__(self, cfg: LTMModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LTMBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) matrices and embedding; output projections scaled by 1/sqrt(2L)
        per residual branch (GPT-2's rule, three branches per block here); unit norms."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(3 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def num_params(self, *, matmul_only: bool = False) -> int:
        """Distinct parameters; `matmul_only` leaves out an untied input embedding (a lookup)."""
        params = {id(p): p for p in self.parameters()}
        if matmul_only and self.embed_tokens.weight is not self.lm_head.weight:
            params.pop(id(self.embed_tokens.weight))
        return sum(p.numel() for p in params.values())

    def forward(self, input_ids: Tensor, z: Tensor, *, targets: Tensor | None = None,
                position_offset: int = 0) -> Tensor:
        """Logits `(B, S, V)`, or with `targets` `(B, S)` the summed NLL of each row `(B,)` over
        positions whose target is not -100 (targets[b, t] = the token that follows position t).

        z: `(B, L, n_l, d)`, one set of latent vectors per layer (cast to the model's dtype).
        """
        cfg = self.config
        b, s = input_ids.shape
        if z.shape[1:] != cfg.latent_shape or z.shape[0] != b:
            raise PipelineError(f"z has shape {tuple(z.shape)}, expected ({b}, {', '.join(map(str, cfg.latent_shape))})")
        x = self.embed_tokens(input_ids)  # (B, S, d)
        z = z.to(x.dtype)
        positions = torch.arange(position_offset, position_offset + s, device=x.device).unsqueeze(0)
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)  # (1, 1, S, hs) each
        z_rope = None
        if cfg.latent_rope:
            z_pos = torch.arange(cfg.latents_per_layer, device=x.device).unsqueeze(0)
            z_rope = rope_cos_sin(z_pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        self_mask = sliding_window_causal(s, cfg.window, backend=cfg.attention_backend)
        # every token sees all of z_l: no mask, so SDPA's unmasked kernels on every device
        cross_mask = AttentionPattern(None, s, cfg.latents_per_layer, backend="sdpa")
        self_mask.prepare(x.device, x.dtype)
        for layer, block in enumerate(self.layers):
            x = block(x, z[:, layer], rope, z_rope, self_mask, cross_mask)
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h)
        logits = self.lm_head(h).float()  # (B, S, V)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        return nll.view(b, s).sum(dim=1)


def next_token_targets(input_ids: Tensor) -> Tensor:
    """targets[b, t] = input_ids[b, t + 1]; the last position predicts nothing (-100)."""
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return targets
