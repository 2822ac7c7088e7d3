"""`AttentionPattern`: one mask rule, compiled once per device, shared by every layer.

A mask rule is a function `rule(meta, b, h, q_idx, kv_idx) -> bool tensor` over
small per-position integer metadata tensors `meta` (a dict of `[B, L]` tensors, B
either the batch size or 1 = shared by the whole batch). It says whether query
`q_idx` of batch row `b` may attend to key `kv_idx`. The same function is compiled
two ways:

- a FlexAttention `BlockMask` (`create_block_mask` vmaps the rule over index
  scalars) for the fused kernel on GPU;
- a dense `[B, 1, Q, K]` bool mask for `scaled_dot_product_attention`, by calling
  the rule once on broadcast index grids (`b: [B,1,1,1]`, `q: [1,1,Q,1]`, ...).

So a rule must use only element-wise tensor ops and indexing of `meta` tensors by
`b`, `q_idx`, `kv_idx` (no Python `if` on tensor values). Keys may be longer than
queries ("prefix + own tokens"): `q_idx` indexes query metadata and `kv_idx` key
metadata, each with its own length.

Backends: `"flex"` (FlexAttention; compiled on CUDA, the unfused reference
implementation on CPU, which has no backward), `"sdpa"` (dense mask), or
`"auto"` = flex on CUDA, SDPA elsewhere. A pattern marked `is_causal` (plain
causal, Q == K) uses SDPA's `is_causal=True` fast path and never builds a mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.attention.blocks import BlockLayout, additive, blocks_attention
from pipeline.errors import PipelineError

Rule = Callable[..., Tensor]
"""`rule(meta: dict[str, Tensor], b, h, q_idx, kv_idx) -> bool Tensor`."""

Backend = Literal["auto", "flex", "sdpa"]
BACKENDS = ("auto", "flex", "sdpa")


@dataclasses.dataclass(eq=False)
class AttentionPattern:
    """Which keys each query sees, plus how to run it; build one per forward pass.

    Usually made by a rule constructor in `pipeline.attention.rules` (`causal`,
    `document_causal`, `prefix_block_causal`, ...). The compiled masks are cached
    on the object, so all layers of a forward (and its backward) share one.
    """

    rule: Rule | None
    """The mask rule; None = every query sees every key (no mask at all)."""
    q_len: int
    """Number of queries (the model's own tokens in this pass)."""
    kv_len: int
    """Number of keys: prefix keys followed by the own tokens' keys."""
    meta: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    """Per-position integer metadata the rule reads, each `[B or 1, L]`."""
    backend: Backend = "auto"
    """"auto" (flex on CUDA, SDPA elsewhere), "flex" or "sdpa"."""
    is_causal: bool = False
    """True only for plain causal with q_len == kv_len: enables SDPA's fast path."""
    block_size: int = 128
    """FlexAttention block size (tokens per sparsity block)."""
    blocks: BlockLayout | None = None
    """Set by `uniform_blocks`: queries are equal blocks that see a prefix and their own
    keys only, so SDPA on CPU may run them as two kernels (`pipeline.attention.blocks`)."""
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise PipelineError(f"attention backend {self.backend!r} is not one of {BACKENDS}")
        if self.q_len < 1 or self.kv_len < 1:
            raise PipelineError(f"attention pattern needs q_len, kv_len >= 1 (got {self.q_len}, {self.kv_len})")
        if self.is_causal and self.q_len != self.kv_len:
            raise PipelineError("is_causal fast path needs q_len == kv_len")
        batches = {t.shape[0] for t in self.meta.values()}
        if any(t.dim() != 2 for t in self.meta.values()) or len(batches - {1}) > 1:
            raise PipelineError("pattern metadata must be [B, L] tensors with one batch size (or 1)")
        nb = self.meta_batch  # rules index meta[b, i]: give every tensor the same batch
        self.meta = {k: v.expand(nb, -1) for k, v in self.meta.items()}

    @property
    def meta_batch(self) -> int:
        """Batch size of the metadata (1 = the same mask for every row)."""
        return max((t.shape[0] for t in self.meta.values()), default=1)

    def with_backend(self, backend: Backend) -> AttentionPattern:
        """The same rule run on another backend (a fresh, empty mask cache)."""
        return dataclasses.replace(self, backend=backend, _cache={})

    def resolve_backend(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        return "flex" if device.type == "cuda" else "sdpa"

    def mask_mod(self, device: torch.device) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The rule with its metadata bound: FlexAttention's `mask_mod(b, h, q, kv)`."""
        if self.rule is None:
            raise PipelineError("this pattern has no rule (all keys visible)")
        meta = {k: v.to(device) for k, v in self.meta.items()}
        if self.meta_batch > 1:
            return functools.partial(self.rule, meta)
        rule = self.rule

        def shared(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            # metadata shared by the batch: FlexAttention may still pass b up to B-1
            return rule(meta, torch.zeros_like(b), h, q_idx, kv_idx)

        return shared

    def dense_mask(self, device: torch.device) -> Tensor | None:
        """Bool `[B or 1, 1, Q, K]` (True = attend), or None when nothing is masked."""
        if self.rule is None:
            return None
        key = ("dense", str(device))
        if key not in self._cache:
            nb = self.meta_batch
            b = torch.arange(nb, device=device).view(nb, 1, 1, 1)
            h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
            q = torch.arange(self.q_len, device=device).view(1, 1, -1, 1)
            kv = torch.arange(self.kv_len, device=device).view(1, 1, 1, -1)
            mask = self.mask_mod(device)(b, h, q, kv)
            self._cache[key] = mask.expand(nb, 1, self.q_len, self.kv_len)
        return self._cache[key]

    def _split(self, device: torch.device) -> bool:
        """Run this SDPA pattern as the two-part CPU path of `pipeline.attention.blocks`?"""
        return self.blocks is not None and self.blocks.split and device.type == "cpu"

    def split_masks(self, device: torch.device, dtype: torch.dtype) -> tuple[list[Tensor], Tensor | None]:
        """Additive masks of a `blocks` pattern, from the rule: for each query group of the
        layout, its queries x the prefix keys it reads `[B or 1, 1, q, k]`; and block 0's
        queries x its own keys `[1, 1, L, I+L]` (None = plain causal). `uniform_blocks` gives
        every query of a block the same prefix and every block the same own-key pattern, so
        the rule runs on one query per block and on block 0 (tests check against the dense mask)."""
        key = ("split", str(device), dtype)
        if key not in self._cache:
            lay, nb, rule = self.blocks, self.meta_batch, self.mask_mod(device)
            b = torch.arange(nb, device=device).view(nb, 1, 1, 1)
            h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
            # the prefix a query sees depends only on its block (its site and document): evaluate
            # the rule for each block's first query, then repeat that row over the block
            n_l = lay.block_len
            first = torch.arange(0, self.q_len, n_l, device=device).view(1, 1, -1, 1)
            kv = torch.arange(lay.prefix_len, device=device).view(1, 1, 1, -1)
            prefix = additive(rule(b, h, first, kv).expand(nb, 1, lay.n_blocks, lay.prefix_len), dtype)
            groups = [prefix[:, :, a // n_l:e // n_l, None, :n].expand(-1, -1, -1, n_l, -1).flatten(2, 3)
                      for a, e, n in lay.groups]
            q_own, kv_own = (t.to(device) for t in lay.block_keys())
            own = rule(b[:1], h, q_own.view(1, 1, -1, 1), kv_own.view(1, 1, 1, -1))
            causal_own = lay.injected == 0 and bool(own.equal(torch.ones_like(own).tril()))
            self._cache[key] = (groups, None if causal_own else additive(own, dtype))
        return self._cache[key]

    def block_mask(self, device: torch.device):
        """The FlexAttention `BlockMask` (batch 1 when the metadata is shared)."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = ("flex", str(device))
        if key not in self._cache:
            if self.rule is None:
                mask_mod, nb = _all_visible, None
            else:
                mask_mod, nb = self.mask_mod(device), self.meta_batch
                nb = None if nb == 1 else nb
            self._cache[key] = create_block_mask(
                mask_mod, nb, None, self.q_len, self.kv_len, device=device, BLOCK_SIZE=self.block_size
            )
        return self._cache[key]

    def prepare(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Compile the mask for `device` now (before activation checkpointing regions)."""
        backend = self.resolve_backend(device)
        if backend == "flex":
            self.block_mask(device)
        elif self._split(device):
            self.split_masks(device, dtype)
        elif not self.is_causal:
            self.dense_mask(device)


def _all_visible(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= 0


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _check_lengths(pattern: AttentionPattern, q_len: int, kv_len: int) -> None:
    if q_len != pattern.q_len or kv_len != pattern.kv_len:
        raise PipelineError(
            f"attention pattern is for {pattern.q_len} queries x {pattern.kv_len} keys, got {q_len} x {kv_len}"
        )


def attend(q: Tensor, k: Tensor, v: Tensor, pattern: AttentionPattern) -> Tensor:
    """Softmax attention of q `(B, nh, Q, hs)` over k, v `(B, nkv, K, hs)` under `pattern`.

    Grouped-query attention (nkv dividing nh) is handled here. Returns `(B, nh, Q, hs)`.
    """
    _check_lengths(pattern, q.shape[2], k.shape[2])
    gqa = k.shape[1] != q.shape[1]
    if pattern.resolve_backend(q.device) == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
        return fn(q, k, v, block_mask=pattern.block_mask(q.device), enable_gqa=gqa)
    if pattern.is_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if pattern._split(q.device):  # keys = [cache ; injected] then the blocks' own
        n = pattern.blocks.prefix_len + pattern.blocks.n_blocks * pattern.blocks.injected
        return attend_after_prefix(q, k[:, :, n:], v[:, :, n:], (k[:, :, :n], v[:, :, :n]), pattern)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.dense_mask(q.device), enable_gqa=gqa)


def attend_after_prefix(q: Tensor, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None,
                        pattern: AttentionPattern) -> Tensor:
    """`attend` over keys [prefix ; own k, v], prefix `(k, v)` each `(B, nkv, P, hs)` or None.

    The same as concatenating first; the two-part CPU path reads the prefix in place.
    """
    if prefix is None:
        return attend(q, k, v, pattern)
    k_pre, v_pre = prefix[0].to(k.dtype), prefix[1].to(v.dtype)
    if pattern._split(q.device):
        _check_lengths(pattern, q.shape[2], k_pre.shape[2] + k.shape[2])
        return blocks_attention(q, k_pre, v_pre, k, v, pattern.blocks, *pattern.split_masks(q.device, q.dtype))
    return attend(q, torch.cat([k_pre, k], dim=2), torch.cat([v_pre, v], dim=2), pattern)
