"""The project's mask rules, each written once as a function of per-position metadata.

Every constructor returns an `AttentionPattern` (rule + metadata + lengths +
backend). Key layout is always "prefix keys, then the pass's own keys".

- `causal(q_len, kv_len)`: query i sees keys <= i + (kv_len - q_len), i.e. the
  whole prefix plus its own causal past; with `key_valid`, padding keys (prompts
  of different lengths decoded as one batch) are hidden from every query.
- `document_causal(doc_ids)`: causal, and only within the same document
  (EOS-separated packing; `doc_ids_from_eos` makes the ids).
- `sliding_window_causal(q_len, window)`: causal, and only the last `window` keys
  (the query's own included): the short context of Latent Thought Models (paper 003).
- `prefix_block_causal(...)`: the dual model's rule. Each query has a block id,
  an index within its block and a prefix limit `p`; a key is either a prefix key
  with a source position (visible iff source position <= p, and, when document
  ids are given, same document) or a block key (visible iff same block and
  index <= the query's index). `uniform_blocks` builds its metadata for the
  common layout of equal, contiguous blocks after a prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.attention.blocks import BlockLayout
from pipeline.attention.pattern import AttentionPattern, Backend
from pipeline.errors import PipelineError

PREFIX_BLOCK = -1
"""Block id marking a prefix (cache) key in `prefix_block_causal` metadata."""


def _as_2d(x: Tensor, name: str) -> Tensor:
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() != 2:
        raise PipelineError(f"{name} must be [L] or [B, L], got shape {tuple(x.shape)}")
    return x


# --- causal ---------------------------------------------------------------------------


def _causal_rule(meta: dict[str, Tensor], b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return kv_idx <= q_idx + meta["offset"][0, 0]


def _padded_causal_rule(meta, b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx + meta["offset"][0, 0]) & (meta["key_valid"][b, kv_idx] != 0)


def causal(q_len: int, kv_len: int | None = None, *, key_valid: Tensor | None = None,
           backend: Backend = "auto") -> AttentionPattern:
    """Plain causal attention; `kv_len - q_len` prefix keys are all visible.

    `key_valid` `[K]` or `[B, K]` (nonzero = a real key): keys marked 0 are padding and
    no query sees them (batched generation over prompts of different lengths). A
    query's own key must be valid, or its row would see nothing.
    """
    kv_len = q_len if kv_len is None else kv_len
    if kv_len < q_len:
        raise PipelineError(f"causal: kv_len ({kv_len}) < q_len ({q_len})")
    offset = torch.tensor([[kv_len - q_len]])
    if key_valid is not None:
        valid = _as_2d(key_valid, "key_valid").long()
        if valid.shape[1] != kv_len:
            raise PipelineError(f"causal: key_valid has length {valid.shape[1]}, expected {kv_len}")
        return AttentionPattern(_padded_causal_rule, q_len, kv_len,
                                {"offset": offset.to(valid.device), "key_valid": valid}, backend=backend)
    if q_len == 1:  # one query after its whole past: nothing to mask (decoding)
        return AttentionPattern(None, q_len, kv_len, backend=backend)
    return AttentionPattern(
        _causal_rule, q_len, kv_len, {"offset": offset}, backend=backend, is_causal=kv_len == q_len
    )


# --- sliding-window causal ---------------------------------------------------------------


def _sliding_window_rule(meta, b, h, q_idx, kv_idx):
    pos = q_idx + meta["offset"][0, 0]  # the query's position among the keys
    return (kv_idx <= pos) & (kv_idx > pos - meta["window"][0, 0])


def sliding_window_causal(q_len: int, window: int, kv_len: int | None = None, *,
                          backend: Backend = "auto") -> AttentionPattern:
    """Causal attention over the last `window` keys, the query's own key included: query i
    (at key position i + kv_len - q_len) sees keys i + kv_len - q_len - window + 1 ... its own.

    Stacked over L layers, position n's output depends on tokens back to n - L (window - 1)
    (each layer reaches `window - 1` further), as with any sliding-window decoder.
    """
    kv_len = q_len if kv_len is None else kv_len
    if kv_len < q_len:
        raise PipelineError(f"sliding_window_causal: kv_len ({kv_len}) < q_len ({q_len})")
    if window < 1:
        raise PipelineError(f"sliding_window_causal: window must be >= 1, got {window}")
    if window >= kv_len:  # nothing falls out of the window: plain causal (and its fast path)
        return causal(q_len, kv_len, backend=backend)
    meta = {"offset": torch.tensor([[kv_len - q_len]]), "window": torch.tensor([[window]])}
    return AttentionPattern(_sliding_window_rule, q_len, kv_len, meta, backend=backend)


# --- document-masked causal --------------------------------------------------------------


def _document_causal_rule(meta, b, h, q_idx, kv_idx):
    doc = meta["doc"]
    return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])


def document_causal(doc_ids: Tensor, *, backend: Backend = "auto") -> AttentionPattern:
    """Causal within each document; `doc_ids` `[B, T]` or `[T]`, equal ids = same document."""
    doc = _as_2d(doc_ids, "doc_ids").long()
    t = doc.shape[1]
    return AttentionPattern(_document_causal_rule, t, t, {"doc": doc}, backend=backend)


def doc_ids_from_eos(input_ids: Tensor, eos_id: int) -> Tensor:
    """Document ids for EOS-separated packing: an EOS ends (and belongs to) its document."""
    is_eos = (input_ids == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos


# --- prefix up to p + causal within block -------------------------------------------------


def _prefix_block_rule(meta, b, h, q_idx, kv_idx):
    kb, ki = meta["kv_block"][b, kv_idx], meta["kv_index"][b, kv_idx]
    qb, qi = meta["q_block"][b, q_idx], meta["q_index"][b, q_idx]
    in_prefix = (kb == PREFIX_BLOCK) & (ki <= meta["q_limit"][b, q_idx])
    if "q_doc" in meta:
        in_prefix = in_prefix & (meta["kv_doc"][b, kv_idx] == meta["q_doc"][b, q_idx])
    in_block = (kb == qb) & (ki <= qi)
    return in_prefix | in_block


def prefix_block_causal(
    q_block: Tensor,
    q_index: Tensor,
    q_limit: Tensor,
    kv_block: Tensor,
    kv_index: Tensor,
    *,
    q_doc: Tensor | None = None,
    kv_doc: Tensor | None = None,
    backend: Backend = "auto",
) -> AttentionPattern:
    """Queries see prefix keys with source position <= their limit, and their block causally.

    All tensors are `[L]` or `[B, L]` integers. Queries (length Q): `q_block` block
    id (>= 0), `q_index` index within the block, `q_limit` the prefix limit `p`.
    Keys (length K): `kv_block` = `PREFIX_BLOCK` (-1) for a prefix key, else its
    block id; `kv_index` = the source position of a prefix key, else its index
    within its block. With `q_doc`/`kv_doc`, a prefix key must also be in the
    query's document (block keys are not doc-checked).
    """
    if (q_doc is None) != (kv_doc is None):
        raise PipelineError("prefix_block_causal: give both q_doc and kv_doc, or neither")
    meta = {
        "q_block": q_block, "q_index": q_index, "q_limit": q_limit,
        "kv_block": kv_block, "kv_index": kv_index,
    }
    if q_doc is not None:
        meta |= {"q_doc": q_doc, "kv_doc": kv_doc}
    meta = {k: _as_2d(v, k).long() for k, v in meta.items()}
    q_len, kv_len = meta["q_block"].shape[1], meta["kv_block"].shape[1]
    for name, t in meta.items():
        want = q_len if name.startswith("q_") else kv_len
        if t.shape[1] != want:
            raise PipelineError(f"prefix_block_causal: {name} has length {t.shape[1]}, expected {want}")
    return AttentionPattern(_prefix_block_rule, q_len, kv_len, meta, backend=backend)


def uniform_blocks(
    limits: Tensor,
    block_len: int,
    prefix_len: int,
    *,
    injected: int = 0,
    prefix_doc: Tensor | None = None,
    limit_doc: Tensor | None = None,
    backend: Backend = "auto",
) -> AttentionPattern:
    """`prefix_block_causal` for M equal blocks laid out contiguously after a prefix.

    `limits` `[M]` or `[B, M]`: block m's prefix limit p_m. Queries are the M
    blocks of `block_len` tokens (block-major). Keys are `prefix_len` prefix keys
    with source positions 0..prefix_len-1, then `injected` keys per block that the
    whole block sees (e.g. another model's K/V for that block; block-major), then
    the same M blocks. Optional `prefix_doc` `[P]`/`[B, P]` document ids of the
    prefix and `limit_doc` `[M]`/`[B, M]` the document of each block (usually
    `prefix_doc[p_m]`).
    """
    limits = _as_2d(limits, "limits").long()
    nb, m = limits.shape
    device = limits.device
    blocks = torch.arange(m, device=device)
    block = blocks.repeat_interleave(block_len)  # (M*L,)
    index = torch.arange(block_len, device=device).repeat(m)  # (M*L,)
    kv_block = torch.cat([
        torch.full((prefix_len,), PREFIX_BLOCK, device=device), blocks.repeat_interleave(injected), block,
    ])
    kv_index = torch.cat([
        torch.arange(prefix_len, device=device),
        torch.full((m * injected,), -1, device=device),  # before every query of its block
        index,
    ])
    docs = {}
    if prefix_doc is not None or limit_doc is not None:
        if prefix_doc is None or limit_doc is None:
            raise PipelineError("uniform_blocks: give both prefix_doc and limit_doc, or neither")
        prefix_doc, limit_doc = _as_2d(prefix_doc, "prefix_doc"), _as_2d(limit_doc, "limit_doc")
        # block and injected keys never use their doc id (they are matched by block id)
        pad = torch.full((prefix_doc.shape[0], m * (injected + block_len)), -1, device=device,
                         dtype=prefix_doc.dtype)
        docs = {
            "q_doc": limit_doc.repeat_interleave(block_len, dim=1),
            "kv_doc": torch.cat([prefix_doc, pad], dim=1),
        }
    pattern = prefix_block_causal(
        block.expand(nb, -1),
        index.expand(nb, -1),
        limits.repeat_interleave(block_len, dim=1),
        kv_block.unsqueeze(0),
        kv_index.unsqueeze(0),
        backend=backend,
        **docs,
    )
    pattern.blocks = BlockLayout.for_limits(limits, prefix_len, injected, block_len)
    return pattern
