"""Every mask rule: FlexAttention (forward, CPU reference) and dense SDPA agree; rules mean what they say."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from pipeline.attention import (
    PREFIX_BLOCK,
    AttentionPattern,
    attend,
    causal,
    doc_ids_from_eos,
    document_causal,
    prefix_block_causal,
    uniform_blocks,
)
from pipeline.errors import PipelineError

B, NH, NKV, HS = 2, 4, 2, 16


def _qkv(q_len, kv_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, q_len, HS, generator=g)
    k = torch.randn(B, NKV, kv_len, HS, generator=g)
    v = torch.randn(B, NKV, kv_len, HS, generator=g)
    return q, k, v


def _flex_vs_sdpa(pattern: AttentionPattern, seed=0):
    q, k, v = _qkv(pattern.q_len, pattern.kv_len, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out_flex = attend(q, k, v, pattern.with_backend("flex"))
    out_sdpa = attend(q, k, v, pattern.with_backend("sdpa"))
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=0)
    return out_sdpa


def _reference(q, k, v, mask):
    """Unfused softmax attention with an explicit bool mask [B,1,Q,K]."""
    k = k.repeat_interleave(NH // NKV, dim=1)
    v = v.repeat_interleave(NH // NKV, dim=1)
    scores = q @ k.transpose(-1, -2) / HS**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("q_len,kv_len", [(64, 64), (40, 64), (1, 17), (130, 200)])
def test_causal_flex_matches_sdpa(q_len, kv_len):
    pattern = causal(q_len, kv_len)
    out = _flex_vs_sdpa(pattern)
    q, k, v = _qkv(q_len, kv_len)
    qi = torch.arange(q_len).view(-1, 1) + (kv_len - q_len)
    mask = (torch.arange(kv_len).view(1, -1) <= qi).expand(B, 1, q_len, kv_len)
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len,kv_len", [(1, 17), (5, 40), (40, 40)])
def test_causal_with_padding_keys(q_len, kv_len):
    """key_valid hides padding keys (right-padded prompts of different lengths) from every query."""
    g = torch.Generator().manual_seed(kv_len)
    valid = torch.rand(B, kv_len, generator=g) > 0.3
    valid[:, kv_len - q_len:] = True  # every query's own key is real
    pattern = causal(q_len, kv_len, key_valid=valid)
    out = _flex_vs_sdpa(pattern)
    qi = torch.arange(q_len).view(-1, 1) + (kv_len - q_len)
    mask = ((torch.arange(kv_len).view(1, -1) <= qi)[None] & valid[:, None, :])[:, None]  # [B, 1, Q, K]
    assert torch.equal(pattern.dense_mask(torch.device("cpu")), mask)
    q, k, v = _qkv(q_len, kv_len)
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=0)
    with pytest.raises(PipelineError, match="key_valid has length"):
        causal(q_len, kv_len + 1, key_valid=valid)


def test_causal_fast_path_only_when_square():
    assert causal(8).is_causal and not causal(8, 12).is_causal
    assert causal(1, 9).rule is None  # decoding step: nothing masked
    with pytest.raises(PipelineError):
        causal(9, 8)


def test_document_causal():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 3] * 8, [4, 0, 0, 5, 6, 7, 8, 0] * 8])
    doc = doc_ids_from_eos(ids, eos)
    assert doc[0, :8].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    pattern = document_causal(doc)
    out = _flex_vs_sdpa(pattern)
    mask = pattern.dense_mask(torch.device("cpu"))
    assert mask.shape == (B, 1, 64, 64)
    assert mask[0, 0, 3, 2].item() is False and mask[0, 0, 3, 3].item() is True
    q, k, v = _qkv(64, 64)
    ref = _reference(q, k, v, (torch.ones(64, 64).tril().bool() & (doc[:, :, None] == doc[:, None, :]))[:, None])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("prefix_len,block_len", [(64, 4), (37, 7), (150, 3)])
def test_uniform_blocks_flex_matches_sdpa(prefix_len, block_len, with_docs):
    g = torch.Generator().manual_seed(prefix_len)
    limits = torch.stack([torch.randperm(prefix_len, generator=g)[:5].sort().values for _ in range(B)])
    docs = {}
    if with_docs:
        prefix_doc = torch.randint(0, 3, (B, prefix_len), generator=g).sort(dim=1).values
        docs = {"prefix_doc": prefix_doc, "limit_doc": prefix_doc.gather(1, limits)}
    pattern = uniform_blocks(limits, block_len, prefix_len, **docs)
    assert (pattern.q_len, pattern.kv_len) == (5 * block_len, prefix_len + 5 * block_len)
    out = _flex_vs_sdpa(pattern)

    # the meaning, spelled out position by position
    mask = torch.zeros(B, 1, pattern.q_len, pattern.kv_len, dtype=torch.bool)
    for b in range(B):
        for m in range(5):
            p = limits[b, m].item()
            for j in range(block_len):
                row = m * block_len + j
                for s in range(p + 1):
                    mask[b, 0, row, s] = not with_docs or bool(docs["prefix_doc"][b, s] == docs["prefix_doc"][b, p])
                mask[b, 0, row, prefix_len + m * block_len : prefix_len + m * block_len + j + 1] = True
    assert torch.equal(pattern.dense_mask(torch.device("cpu")), mask)
    q, k, v = _qkv(pattern.q_len, pattern.kv_len)
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_prefix_block_keys_not_contiguous():
    """h1-style layout: prefix, then injected keys of every block, then the queries' own keys."""
    s, m, n_l, n_a = 50, 3, 2, 4
    limits = torch.tensor([10, 25, 44])
    q_block = torch.arange(m).repeat_interleave(n_a)
    q_index = n_l + torch.arange(n_a).repeat(m)
    kv_block = torch.cat([torch.full((s,), PREFIX_BLOCK), torch.arange(m).repeat_interleave(n_l), q_block])
    kv_index = torch.cat([torch.arange(s), torch.arange(n_l).repeat(m), q_index])
    pattern = prefix_block_causal(q_block, q_index, limits.repeat_interleave(n_a), kv_block, kv_index)
    _flex_vs_sdpa(pattern)
    mask = pattern.dense_mask(torch.device("cpu"))[0, 0]
    row = 1 * n_a + 2  # block 1, third query
    visible = mask[row].nonzero().flatten().tolist()
    injected = [s + 1 * n_l, s + 1 * n_l + 1]
    own = [s + m * n_l + 1 * n_a + i for i in range(3)]
    assert visible == list(range(26)) + injected + own


def test_pattern_shape_mismatch_is_an_error():
    q, k, v = _qkv(8, 8)
    with pytest.raises(PipelineError, match="8 x 8"):
        attend(q, k, v, causal(8, 10))


def test_dense_mask_cached_once():
    pattern = document_causal(torch.zeros(64, dtype=torch.long))
    cpu = torch.device("cpu")
    assert pattern.dense_mask(cpu) is pattern.dense_mask(cpu)


def test_sdpa_gqa_matches_repeat():
    q, k, v = _qkv(64, 64)
    out = attend(q, k, v, causal(64))
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    torch.testing.assert_close(out, ref)
