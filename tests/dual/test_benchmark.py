"""The dual benchmark runs end to end and credits attention only for visible pairs (no timings asserted)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.dual import benchmark


def test_attention_flops_count_visible_pairs_only():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    causal = benchmark._count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert causal == 2 * (2 * 10) * (8 + 8)  # 2 heads x 10 pairs (1+2+3+4), QK and PV
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[1, 0] = mask[1, 1] = mask[3, 3] = True  # 4 visible pairs (a row may be empty
    mask[2, 0] = True  # for the count, not for softmax: keep every row non-empty)
    masked = benchmark._count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert masked == 2 * (2 * int(mask.sum())) * (8 + 8)
    qg = q.clone().requires_grad_(True)
    both = benchmark._count_flops(lambda: F.scaled_dot_product_attention(qg, k, v, is_causal=True).sum().backward())
    assert both == 3 * causal  # backward = twice the forward


def test_flops_by_kind_separate_attention_from_matmuls():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    w = torch.randn(8, 3)
    kinds = benchmark._flops_by_kind(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True) @ w)
    assert kinds == {"attention": 2 * (2 * 10) * (8 + 8), "matmul": 2 * (2 * 4) * 8 * 3, "other": 0}
    assert benchmark._kind("_TwoPartAttentionBackward") == "attention"
    assert benchmark._kind("aten::addmm") == "matmul" and benchmark._kind("aten::gelu") == "other"


def test_benchmark_prints_every_row(capsys):
    rc = benchmark.main(["--seq", "64", "--sites", "1", "8", "--rounds", "1", "--burst", "1", "--breakdown",
                         "--decode", "--decode-backends", "sdpa", "--decode-seq", "64", "--decode-sites", "4",
                         "--decode-latents", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["8"])]
    assert [r[0] for r in rows] == ["1", "8"]
    for row in rows:  # M, packed ms, loop ms, speedup, target, packed GFLOP/s, plain GFLOP/s, ratio
        assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[-1]) > 0
    assert "decode pass (pass 3)" in out and "sdpa" in out
    # breakdown: step, matmul ms, GFLOP/s, attention ms, GFLOP/s, other ms, share, total ms
    profiled = [line.split() for line in out.splitlines() if line.startswith(("plain ", "packed M="))]
    assert [r[0] if r[0] == "plain" else r[1] for r in profiled] == ["plain", "M=1", "M=8"]
    for row in profiled:
        matmul_ms, attention_ms, other_ms, total_ms = (float(row[i]) for i in (-7, -5, -3, -1))
        assert min(matmul_ms, attention_ms, other_ms) > 0 and float(row[-6]) > 0  # matmul FLOPs were counted
        assert abs(matmul_ms + attention_ms + other_ms - total_ms) < 0.02


def test_flex_decode_on_cpu_is_refused(capsys):
    assert benchmark.main(["--decode", "--sites", "1"]) == 2
    assert "no backward on CPU" in capsys.readouterr().err
