"""`pipeline.flops` pinned on small numbers, and the dual benchmark's counter agreeing with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import flops
from pipeline.dual import benchmark as dual_benchmark
from pipeline.models import benchmark as model_benchmark
from pipeline.models import build_model, preset


def test_causal_pairs():
    assert flops.causal_pairs(1) == 1
    assert flops.causal_pairs(4) == 1 + 2 + 3 + 4
    assert flops.causal_pairs(4, 4) == 10
    assert flops.causal_pairs(2, 5) == 4 + 5  # 3 prefix keys: query 0 sees 4 keys, query 1 sees 5
    assert flops.causal_pairs(1, 7) == 7  # one decode step over a cache sees everything
    with pytest.raises(ValueError, match="k_len 2 < q_len 3"):
        flops.causal_pairs(3, 2)


def test_attention_flops():
    assert flops.attention_pair_flops(16) == 2 * (16 + 16)
    assert flops.attention_pair_flops(16, 8) == 2 * (16 + 8)
    assert flops.attention_flops(10, n_layer=1, n_head=1, head_dim=16) == 2 * 10 * 32 == 640
    assert flops.attention_flops(10, n_layer=1, n_head=1, head_dim=16, backward=True) == 3 * 640 == 1920
    assert flops.attention_flops(10, n_layer=2, n_head=3, head_dim=16) == 6 * 640


def test_matmul_flops():
    assert flops.matmul_flops(100, 3) == 2 * 100 * 3
    assert flops.matmul_flops(100, 3, input_grad=True) == 4 * 300
    assert flops.matmul_flops(100, 3, input_grad=True, weight_grad=True) == 6 * 300
    assert flops.matmul_flops(100, 3, forward=False, weight_grad=True) == 2 * 300
    assert flops.matmul_flops(100, 3, forward=False) == 0


def test_training_flops_per_token_on_gpt2_tiny():
    config = preset("gpt2-tiny")
    n = build_model(config).num_params(matmul_only=True)
    L, H, hd, T = config.n_layer, config.n_head, config.head_dim, 64
    # by hand: 6 N, plus per layer and head T(T+1)/2 pairs x 4 hd forward x 3 (fwd + bwd), per token
    by_hand = 6 * n + L * H * (T * (T + 1) / 2) * (4 * hd) * 3 / T
    assert flops.training_flops_per_token(n, L, H, hd, T) == pytest.approx(by_hand, rel=1e-12)
    model = build_model(config)
    assert model_benchmark.flops_per_token(model, config, T) == flops.training_flops_per_token(n, L, H, hd, T)


def test_mfu_and_peak(monkeypatch):
    assert flops.mfu(500.0, 1000.0, world=2) == 0.25  # 500 TFLOP/s over two 1000 TFLOP/s devices
    assert flops.mfu(500.0, None, world=2) is None
    assert flops.peak_tflops(torch.device("cpu")) is None
    assert flops.peak_tflops(torch.device("cpu"), 100.0) == 100.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert flops.peak_tflops(torch.device("cuda")) == flops.PEAK_BF16_TFLOPS["H200"] == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert flops.peak_tflops(torch.device("cuda")) is None


def test_dual_benchmark_counts_attention_like_pipeline_flops():
    B, H, T, hd = 2, 3, 5, 8
    q, k, v = (torch.randn(B, H, T, hd) for _ in range(3))
    counted = dual_benchmark._flops_by_kind(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    expected = flops.attention_flops(flops.causal_pairs(T) * B, n_layer=1, n_head=H, head_dim=hd)
    assert counted == {"attention": expected, "matmul": 0, "other": 0}
    qg = q.clone().requires_grad_(True)
    both = dual_benchmark._count_flops(
        lambda: F.scaled_dot_product_attention(qg, k, v, is_causal=True).sum().backward())
    assert both == flops.attention_flops(flops.causal_pairs(T) * B, n_layer=1, n_head=H, head_dim=hd, backward=True)


def test_dual_benchmark_counts_a_plain_step_like_pipeline_flops():
    """A whole gpt2-tiny training step, counted op by op, is 6 x (Linear weights) x tokens plus
    the causal attention term: the two counts agree by construction, not by tolerance.
    (`num_params(matmul_only=True)` also holds biases and norm gains, ~1.5% more here.)"""
    config = preset("gpt2-tiny")
    torch.manual_seed(0)
    model = build_model(config)
    B, T = 2, 64
    x = torch.randint(0, config.vocab_size, (B, T))
    counted = dual_benchmark._flops_by_kind(
        lambda: F.cross_entropy(model(x).logits.flatten(0, 1), x.flatten()).backward())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_token = flops.training_flops_per_token(linear, config.n_layer, config.n_head, config.head_dim, T)
    assert counted["matmul"] == flops.matmul_flops(linear, B * T, input_grad=True, weight_grad=True)
    assert counted["attention"] == flops.attention_flops(
        flops.causal_pairs(T) * B, n_layer=config.n_layer, n_head=config.n_head, head_dim=config.head_dim,
        backward=True)
    assert counted["matmul"] + counted["attention"] == pytest.approx(per_token * B * T, rel=1e-12)
