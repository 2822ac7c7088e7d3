"""The CPU two-kernel path for `uniform_blocks` equals dense-mask SDPA, forward and backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.attention import attend, uniform_blocks
from pipeline.attention.blocks import BlockLayout

B, NH, HS = 2, 4, 8


def _pattern(prefix_len, n_blocks, block_len, injected, with_docs, seed):
    g = torch.Generator().manual_seed(seed)
    limits = torch.randint(0, prefix_len, (B, n_blocks), generator=g).sort(dim=1).values
    docs = {}
    if with_docs:
        prefix_doc = torch.cumsum((torch.rand(B, prefix_len, generator=g) < 0.2).long(), dim=1)
        docs = {"prefix_doc": prefix_doc, "limit_doc": prefix_doc.gather(1, limits)}
    pattern = uniform_blocks(limits, block_len, prefix_len, injected=injected, **docs)
    # the two-part path also where one dense kernel would be cheaper
    pattern.blocks = BlockLayout.for_limits(limits, prefix_len, injected, block_len, split=True)
    return pattern


@pytest.mark.parametrize(
    "prefix_len,n_blocks,block_len,injected,nkv,with_docs",
    [
        (20, 3, 5, 0, 4, False),  # liu / h2 decode, Coprocessor pass
        (20, 3, 5, 4, 4, False),  # h1: Coprocessor K/V injected per block
        (33, 4, 6, 0, 4, True),  # document masks on the prefix
        (33, 4, 6, 3, 2, True),  # all of it, grouped-query attention
        (9, 1, 1, 0, 4, False),  # M = 1, N_A = 1
        (64, 16, 16, 0, 2, False),
    ],
)
def test_split_path_equals_dense_mask(prefix_len, n_blocks, block_len, injected, nkv, with_docs):
    pattern = _pattern(prefix_len, n_blocks, block_len, injected, with_docs, seed=prefix_len + injected)
    dense = dataclasses.replace(pattern, blocks=None, _cache={})  # same rule, one dense mask
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, NH, pattern.q_len, HS, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, nkv, pattern.kv_len, HS, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, nkv, pattern.kv_len, HS, dtype=torch.float64, generator=g, requires_grad=True)

    out = attend(q, k, v, pattern)
    assert any(key[0] == "split" for key in pattern._cache), "the two-kernel path was not taken"
    ref = attend(q, k, v, dense)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)

    grad = torch.randn(out.shape, dtype=out.dtype, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=f"d{name} differs")


def test_split_only_where_it_pays():
    """Few blocks: one dense kernel; many: the two-part path (figures in blocks.py)."""
    limits = torch.arange(64).mul(3).unsqueeze(0)
    assert not uniform_blocks(limits[:, :1], 16, 256).blocks.split  # M = 1
    assert not uniform_blocks(limits[:, :8], 16, 256).blocks.split
    assert uniform_blocks(limits[:, :16], 16, 256).blocks.split
    assert uniform_blocks(limits, 8, 256).blocks.split


def test_split_masks_come_from_the_rule():
    """Pieces of the dense mask: prefix columns, and block 0's own (injected + causal) keys."""
    pattern = _pattern(30, 3, 4, 2, True, seed=3)
    cpu = torch.device("cpu")
    groups, own = pattern.split_masks(cpu, torch.float32)
    dense = pattern.dense_mask(cpu)
    lay = pattern.blocks
    assert [(a, e) for a, e, _ in lay.groups] == [(0, 8), (8, 12)]  # blocks 0-1, block 2
    for (a, e, n), mask in zip(lay.groups, groups, strict=True):
        assert torch.equal(mask > float("-inf"), dense[:, :, a:e, :n])
        assert not dense[:, :, a:e, n:30].any()  # the keys a group skips are masked for it
    for m in range(lay.n_blocks):  # every block sees its own keys the way block 0 does
        rows = slice(m * lay.block_len, (m + 1) * lay.block_len)
        injected = dense[:, 0, rows, 30 + m * 2:30 + (m + 1) * 2]
        tokens = dense[:, 0, rows, 30 + 3 * 2 + m * 4:30 + 3 * 2 + (m + 1) * 4]
        assert torch.equal(torch.cat([injected, tokens], dim=-1), (own[0] > float("-inf")).expand(B, 4, 6))
    causal_only = _pattern(30, 3, 4, 0, False, seed=3)
    assert causal_only.split_masks(cpu, torch.float32)[1] is None  # SDPA's causal fast path
