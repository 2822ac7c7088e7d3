"""CPU execution of a `uniform_blocks` pattern without the masked-out work.

A `uniform_blocks` pattern (the dual model's Coprocessor and decode passes) has
M blocks of L queries. Each query sees a prefix (the cache, up to its block's
site) and its own block, nothing else. A dense `[M*L, P + M*(I+L)]` mask makes
SDPA compute every block against every other block and throw the scores away:
at M = 64, L = 16 that is ~5x the useful work. The work splits into two
fused kernels instead:

    part A  every query over the P prefix keys      [M*L x P], mask = the rule
    part B  each block over its own I + L keys      [L x (I+L)] per block, batched

and the two softmaxes merge exactly by their log-sum-exps:

    lse = logaddexp(lse_A, lse_B),  out = e^(lse_A - lse) out_A + e^(lse_B - lse) out_B

The backward is the same trick ring attention uses: each part's flash backward,
given the *merged* output and log-sum-exp, returns that part's exact share of
the gradients (dS = P (dP - rowsum(dO * O)) with P normalised by the merged
lse), so dq = dq_A + dq_B and each part's dk, dv are complete.

Part A runs in a few query groups of consecutive blocks (sites are sorted), each
over only the prefix keys its last block can see, so a block early in the
sequence does not pay for the whole prefix. Both parts call torch's CPU
flash-attention kernels (the ones
`F.scaled_dot_product_attention` dispatches to on CPU), which return the
log-sum-exp the merge needs. On CUDA the FlexAttention `BlockMask` already skips
masked tiles, so this path is CPU-only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

PREFIX_GROUPS = 2
"""Query groups of part A: more groups skip more masked keys, each costs a kernel call
(2 was best or near it for M in 16..64 blocks of 8..16 after 256 keys, gpt2-tiny heads)."""


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Key/query layout of a `uniform_blocks` pattern.

    Queries: `n_blocks` blocks of `block_len` (block-major). Keys: `prefix_len`
    prefix keys, then `injected` keys per block (block-major), then the blocks.
    `groups`: part A's query groups `(first query, end query, prefix keys seen)`.
    `split`: run the two-part path (else one dense-mask kernel is cheaper).
    """

    prefix_len: int
    injected: int
    n_blocks: int
    block_len: int
    groups: tuple[tuple[int, int, int], ...]
    split: bool

    @classmethod
    def for_limits(cls, limits: Tensor, prefix_len: int, injected: int, block_len: int,
                   split: bool | None = None) -> BlockLayout:
        """`limits` `[B, M]` sorted along M: block m sees prefix keys up to limits[:, m].
        `split`: force the two-part path on or off (None: where it pays, on CPU)."""
        m = limits.shape[1]
        if split is None:
            # A dense mask makes each query score the other blocks' keys too; split when that
            # is more than half the prefix. Few blocks: one dense kernel beats three (M=1: 2.5x).
            split = (m - 1) * (injected + block_len) > prefix_len / 2 and limits.device.type == "cpu"
        groups: tuple[tuple[int, int, int], ...] = ()
        if split:  # (the group bounds read the limits: only where they are used, never on a GPU)
            ends = [min(m, (g + 1) * -(-m // PREFIX_GROUPS)) for g in range(min(m, PREFIX_GROUPS))]
            starts = [0, *ends[:-1]]
            last_limit = limits.amax(dim=0).cummax(dim=0).values.tolist()  # robust to unsorted limits
            groups = tuple(
                (a * block_len, b * block_len, min(prefix_len, last_limit[b - 1] + 1))
                for a, b in zip(starts, ends, strict=True) if b > a
            )
        return cls(prefix_len, injected, m, block_len, groups, split)

    def block_keys(self) -> tuple[Tensor, Tensor]:
        """Query and key indices of block 0's own part (injected keys, then its tokens)."""
        p, i, m, n = self.prefix_len, self.injected, self.n_blocks, self.block_len
        q = torch.arange(n)
        kv = torch.cat([p + torch.arange(i), p + m * i + torch.arange(n)])
        return q, kv


def _per_block(t: Tensor, n_blocks: int) -> Tensor:
    """`(B, H, M*n, ...)` -> `(B*M, H, n, ...)`."""
    b, h, mn = t.shape[:3]
    t = t.unflatten(2, (n_blocks, mn // n_blocks)).transpose(1, 2)
    return t.reshape(b * n_blocks, h, mn // n_blocks, *t.shape[4:])


def _per_sequence(t: Tensor, n_blocks: int) -> Tensor:
    """`(B*M, H, n, ...)` -> `(B, H, M*n, ...)` (inverse of `_per_block`)."""
    bm, h, n = t.shape[:3]
    t = t.unflatten(0, (bm // n_blocks, n_blocks)).transpose(1, 2)
    return t.reshape(bm // n_blocks, h, n_blocks * n, *t.shape[4:])


class _TwoPartAttention(torch.autograd.Function):
    """Softmax attention over [prefix keys (part A, in query groups) ; own-block keys (part B)]."""

    @staticmethod
    def forward(ctx, q, k_pre, v_pre, q_blk, k_blk, v_blk, layout, prefix_masks, mask_blk):
        m = layout.n_blocks
        parts = [_flash(q[:, :, a:b], k_pre[:, :, :n], v_pre[:, :, :n], 0.0, False, attn_mask=mask)
                 for (a, b, n), mask in zip(layout.groups, prefix_masks, strict=True)]
        out_a = torch.cat([o for o, _ in parts], dim=2)
        lse_a = torch.cat([lse for _, lse in parts], dim=2)
        out_b, lse_b = _flash(q_blk, k_blk, v_blk, 0.0, mask_blk is None, attn_mask=mask_blk)
        out_b, lse_b = _per_sequence(out_b, m), _per_sequence(lse_b, m)
        lse = torch.logaddexp(lse_a, lse_b)
        out = torch.lerp(out_a, out_b, torch.sigmoid(lse_b - lse_a).unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, k_pre, v_pre, q_blk, k_blk, v_blk, out, lse)
        ctx.layout, ctx.prefix_masks, ctx.mask_blk = layout, prefix_masks, mask_blk
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_pre, v_pre, q_blk, k_blk, v_blk, out, lse = ctx.saved_tensors
        layout, m = ctx.layout, ctx.layout.n_blocks
        grad = grad.contiguous()
        dq = torch.empty_like(q)
        dk_pre, dv_pre = torch.zeros_like(k_pre), torch.zeros_like(v_pre)
        for (a, b, n), mask in zip(layout.groups, ctx.prefix_masks, strict=True):
            dq_g, dk_g, dv_g = _flash_backward(
                grad[:, :, a:b], q[:, :, a:b], k_pre[:, :, :n], v_pre[:, :, :n], out[:, :, a:b],
                lse[:, :, a:b], 0.0, False, attn_mask=mask,
            )
            dq[:, :, a:b] = dq_g
            dk_pre[:, :, :n] += dk_g
            dv_pre[:, :, :n] += dv_g
        dq_blk, dk_blk, dv_blk = _flash_backward(
            _per_block(grad, m), q_blk, k_blk, v_blk, _per_block(out, m), _per_block(lse, m).contiguous(),
            0.0, ctx.mask_blk is None, attn_mask=ctx.mask_blk,
        )
        return dq, dk_pre, dv_pre, dq_blk, dk_blk, dv_blk, None, None, None


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> the additive float mask the flash kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def blocks_attention(q: Tensor, k_pre: Tensor, v_pre: Tensor, k_own: Tensor, v_own: Tensor,
                     layout: BlockLayout, prefix_masks: list[Tensor], block_mask: Tensor | None) -> Tensor:
    """Attention of q `(B, nh, M*L, hs)` over a prefix `(B, nkv, P + M*I, hs)` (cache keys, then
    each block's injected keys) and the blocks' own keys `(B, nkv, M*L, hs)`.

    `prefix_masks`: additive `[B or 1, 1, queries, keys]` per query group of `layout`;
    `block_mask` additive `[1, 1, L, I+L]`: which of its own block's keys a query
    sees, the same for every block (None = plain causal). Both come from
    `AttentionPattern.split_masks`. Returns `(B, nh, M*L, hs)`, equal to dense
    SDPA under the full mask.
    """
    nh = q.shape[1]
    if k_pre.shape[1] != nh:  # grouped-query attention: the CPU kernels want equal heads
        rep = nh // k_pre.shape[1]
        k_pre, v_pre, k_own, v_own = (t.repeat_interleave(rep, dim=1) for t in (k_pre, v_pre, k_own, v_own))
    p, i, m = layout.prefix_len, layout.injected, layout.n_blocks

    def own(pre: Tensor, tokens: Tensor) -> Tensor:
        blk = _per_block(tokens, m)
        return blk if i == 0 else torch.cat([_per_block(pre[:, :, p:], m), blk], dim=2)

    return _TwoPartAttention.apply(
        q, k_pre[:, :, :p], v_pre[:, :, :p], _per_block(q, m), own(k_pre, k_own), own(v_pre, v_own),
        layout, prefix_masks, block_mask,
    )
