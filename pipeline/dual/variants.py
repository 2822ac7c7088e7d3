"""The variants of DESIGN.md §3, as data: one row each, read by the dual model.

A row says what fills the latent slots of the decode pass, whether pass 2 (the
Coprocessor) runs, and which parameter groups train by default. Nothing else in
the package branches on a variant's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import PipelineError

#: What fills the N_L latent slots of a site in pass 3.
#: - "coprocessor_output": the Coprocessor's final hidden states Z, as input embeddings
#: - "coprocessor_kv": no slot queries; the Coprocessor's per-layer K/V join the cache (h1)
#: - "slot_embeddings": N_L learnable slot-specific embeddings
#: - "pause": one learnable embedding repeated N_L times
#: - "none": no augmentation; plain causal LM loss on x
SlotSource = Literal["coprocessor_output", "coprocessor_kv", "slot_embeddings", "pause", "none"]


@dataclass(frozen=True)
class Variant:
    name: str
    slots: SlotSource
    train_base: bool
    """Whether the Base trains by default (`freeze_base` overrides it)."""
    source: str
    """Where the variant comes from (paper and section)."""

    @property
    def has_coprocessor(self) -> bool:
        return self.slots in ("coprocessor_output", "coprocessor_kv")

    @property
    def augments(self) -> bool:
        return self.slots != "none"

    @property
    def reread_required(self) -> bool:
        """h1 has no slot queries, so its first prediction must come from re-reading x[p]."""
        return self.slots == "coprocessor_kv"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("liu", "coprocessor_output", train_base=False, source="paper 002"),
        Variant("h1", "coprocessor_kv", train_base=False, source="paper 000, Hyp. 1"),
        Variant("h2", "coprocessor_output", train_base=True, source="paper 000, Hyp. 2"),
        Variant("soft_embedding", "slot_embeddings", train_base=True, source="paper 000, baseline 2"),
        Variant("pause", "pause", train_base=False, source="paper 002 §3.3.1"),
        Variant("continued_pretraining", "none", train_base=True, source="paper 000, baseline 1"),
    ]
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise PipelineError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
