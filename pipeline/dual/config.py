"""`DualConfig`: the variant and its options (DESIGN.md §3)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.attention import BACKENDS, Backend
from pipeline.dual.variants import Variant, get_variant
from pipeline.errors import PipelineError


@dataclasses.dataclass
class DualConfig:
    variant: str = "liu"
    """One of pipeline.dual.variants.VARIANTS: liu, h1, h2, soft_embedding, pause,
    continued_pretraining."""
    n_latents: int = 16
    """N_L: latent slots per augmentation site."""
    n_ahead: int = 16
    """N_A: ahead tokens (targets) per site."""
    n_sites: int = 64
    """M: augmentation sites sampled per packed sequence."""
    coprocessor_init: Literal["base", "scratch"] = "base"
    """Coprocessor starts as a copy of the Base, or from a fresh random init of its config."""
    coprocessor_input: Literal["kv_cache", "last_hidden"] = "kv_cache"
    """What the Coprocessor reads: the Base's per-layer cache, or its last-layer hidden
    states as input embeddings (paper 002 §3.3.3)."""
    coprocessor_adapter: Literal["full", "lora"] = "full"
    """Train the whole Coprocessor, or LoRA adapters on its linear layers (merged on export)."""
    lora_rank: int = 16
    """LoRA rank r (with coprocessor_adapter=lora)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator (the update is alpha/r * B A)."""
    orthogonality_weight: float = 0.0
    """λ of the penalty λ · mean_m ||ẑ_m ẑ_mᵀ − I||² on row-normalised slot latents."""
    lm_loss_weight: float = 0.0
    """Weight of the standard causal LM loss on x from pass 1, added to the ahead loss."""
    freeze_base: bool | None = None
    """Freeze (True) or train (False) the Base; None = the variant's default."""
    latent_readout: Literal["hidden", "vocab"] = "hidden"
    """What the Base reads at the slots (liu, h2): the Coprocessor's final hidden states Z
    (the papers), or `vocab`: softmax(head(Z)) @ C, the expected row of a trained code table
    C under the Coprocessor's own next-token distribution (C starts as the Base's token
    embeddings). Issue 13 measured that a frozen tiny Base reads neither Z nor its own
    embeddings well, while a trained code carries a perfect draft ~3x better."""
    draft_loss_weight: float = 0.0
    """w of the draft loss (liu, h2): slot j's Coprocessor head predicts x[p+1+j] for
    j < min(N_L, N_A), and w x that cross-entropy joins the objective, a direct next-token
    signal for the Coprocessor (issue 13: without it the slots know less than the Base)."""
    decode_reread: bool = False
    """Embedding variants: re-read x[p] after the slots, as h1 always does."""
    document_mask: bool = False
    """Attention stays inside EOS-delimited documents (all three passes)."""
    document_aware_sites: bool = False
    """Refuse sites whose ahead tokens run into the next document."""
    attention_backend: Backend = "auto"
    """Attention of the site passes: auto = FlexAttention on CUDA, SDPA on CPU; force one
    to compare them (`benchmark.py dual --device cuda` does) or to debug."""

    def __post_init__(self) -> None:
        spec = self.spec  # raises on an unknown variant
        for name in ("n_latents", "n_ahead", "n_sites"):
            if getattr(self, name) < 1:
                raise PipelineError(f"dual.{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_backend not in BACKENDS:
            raise PipelineError(f"dual.attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.coprocessor_adapter == "lora" and self.lora_rank < 1:
            raise PipelineError(f"dual.lora_rank must be >= 1, got {self.lora_rank}")
        if self.orthogonality_weight < 0 or self.lm_loss_weight < 0 or self.draft_loss_weight < 0:
            raise PipelineError("dual.orthogonality_weight, dual.lm_loss_weight and dual.draft_loss_weight must be >= 0")
        if self.latent_readout not in ("hidden", "vocab"):
            raise PipelineError(f"dual.latent_readout must be hidden or vocab, got {self.latent_readout!r}")
        if (self.latent_readout == "vocab" or self.draft_loss_weight > 0) and spec.slots != "coprocessor_output":
            raise PipelineError(
                f"dual.latent_readout=vocab and dual.draft_loss_weight apply to variants whose slots hold the "
                f"Coprocessor's output (liu, h2); variant {self.variant!r} has none (leave them at hidden / 0)"
            )
        if self.orthogonality_weight > 0 and spec.slots in ("coprocessor_kv", "none"):
            raise PipelineError(
                f"dual.orthogonality_weight applies to latents used as slot embeddings; variant "
                f"{self.variant!r} has none (set it to 0)"
            )
        if spec.slots == "none" and self.freeze_base:
            raise PipelineError("continued_pretraining with freeze_base=true would train nothing")

    @property
    def spec(self) -> Variant:
        return get_variant(self.variant)

    @property
    def reread(self) -> bool:
        """Whether the decode block re-reads x[p] after the slots."""
        return self.spec.reread_required or (self.decode_reread and self.spec.augments)

    @property
    def train_base(self) -> bool:
        return self.spec.train_base if self.freeze_base is None else not self.freeze_base
