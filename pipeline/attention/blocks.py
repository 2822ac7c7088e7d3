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

Both parts call torch's CPU flash-attention kernels (the ones
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


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Key/query layout of a `uniform_blocks` pattern.

    Queries: `n_blocks` blocks of `block_len` (block-major). Keys: `prefix_len`
    prefix keys, then `injected` keys per block (block-major), then the blocks.
    """

    prefix_len: int
    injected: int
    n_blocks: int
    block_len: int

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
    """Softmax attention over [prefix keys (part A) ; own-block keys (part B)]."""

    @staticmethod
    def forward(ctx, q, k_pre, v_pre, mask_pre, q_blk, k_blk, v_blk, mask_blk, n_blocks):
        causal_blk = mask_blk is None
        out_a, lse_a = _flash(q, k_pre, v_pre, 0.0, False, attn_mask=mask_pre)
        out_b, lse_b = _flash(q_blk, k_blk, v_blk, 0.0, causal_blk, attn_mask=mask_blk)
        out_b, lse_b = _per_sequence(out_b, n_blocks), _per_sequence(lse_b, n_blocks)
        lse = torch.logaddexp(lse_a, lse_b)
        out = out_a * (lse_a - lse).exp().unsqueeze(-1) + out_b * (lse_b - lse).exp().unsqueeze(-1)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k_pre, v_pre, mask_pre, q_blk, k_blk, v_blk, mask_blk, out, lse)
        ctx.n_blocks, ctx.causal_blk = n_blocks, causal_blk
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_pre, v_pre, mask_pre, q_blk, k_blk, v_blk, mask_blk, out, lse = ctx.saved_tensors
        m = ctx.n_blocks
        grad = grad.contiguous()
        dq, dk_pre, dv_pre = _flash_backward(grad, q, k_pre, v_pre, out, lse, 0.0, False, attn_mask=mask_pre)
        dq_blk, dk_blk, dv_blk = _flash_backward(
            _per_block(grad, m), q_blk, k_blk, v_blk, _per_block(out, m), _per_block(lse, m).contiguous(),
            0.0, ctx.causal_blk, attn_mask=mask_blk,
        )
        return dq, dk_pre, dv_pre, None, dq_blk, dk_blk, dv_blk, None, None


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> the additive float mask the flash kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def blocks_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, prefix_mask: Tensor,
                     block_mask: Tensor | None) -> Tensor:
    """Attention of q `(B, nh, M*L, hs)` over k, v `(B, nkv, P + M*(I+L), hs)`.

    `prefix_mask` additive `[B or 1, 1, M*L, P]`: which prefix keys each query sees;
    `block_mask` additive `[1, 1, L, I+L]`: which of its own block's keys a query
    sees, the same for every block (None = plain causal). Both come from
    `AttentionPattern.split_masks`. Returns `(B, nh, M*L, hs)`, equal to dense
    SDPA under the full mask.
    """
    nh = q.shape[1]
    if k.shape[1] != nh:  # grouped-query attention: the CPU kernels want equal heads
        k = k.repeat_interleave(nh // k.shape[1], dim=1)
        v = v.repeat_interleave(nh // v.shape[1], dim=1)
    p, i, m = layout.prefix_len, layout.injected, layout.n_blocks

    def own(t: Tensor) -> Tensor:
        blk = _per_block(t[:, :, p + m * i:], m)
        return blk if i == 0 else torch.cat([_per_block(t[:, :, p:p + m * i], m), blk], dim=2)

    return _TwoPartAttention.apply(
        q, k[:, :, :p], v[:, :, :p], prefix_mask, _per_block(q, m), own(k), own(v), block_mask, m,
    )
