"""Mask rules written once, compiled to a FlexAttention `BlockMask` or a dense SDPA mask.

    from pipeline.attention import causal, document_causal, prefix_block_causal, attend
    pattern = document_causal(doc_ids)           # an AttentionPattern
    out = attend(q, k, v, pattern)               # flex on CUDA, SDPA on CPU (overridable)
"""

from pipeline.attention.pattern import (
    BACKENDS,
    AttentionPattern,
    Backend,
    Rule,
    attend,
    attend_after_prefix,
)
from pipeline.attention.rules import (
    PREFIX_BLOCK,
    causal,
    doc_ids_from_eos,
    document_causal,
    prefix_block_causal,
    sliding_window_causal,
    uniform_blocks,
)

__all__ = [
    "BACKENDS",
    "PREFIX_BLOCK",
    "AttentionPattern",
    "Backend",
    "Rule",
    "attend",
    "attend_after_prefix",
    "causal",
    "doc_ids_from_eos",
    "document_causal",
    "prefix_block_causal",
    "sliding_window_causal",
    "uniform_blocks",
]
