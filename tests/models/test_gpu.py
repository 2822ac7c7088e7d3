"""GPU only: the compiled FlexAttention path trains like dense SDPA (forward and backward)."""

from __future__ import annotations

import pytest
import torch

from pipeline.attention import document_causal, uniform_blocks
from pipeline.models import build_model, preset

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["gpt2-tiny", "qwen3-tiny"])
def test_flex_matches_sdpa_with_grads_on_cuda(name):
    torch.manual_seed(0)
    model = build_model(preset(name)).cuda()
    x = torch.randint(0, 256, (2, 64), device="cuda")
    doc = (torch.arange(64, device="cuda") >= 29).long()
    limits = torch.tensor([3, 30, 50], device="cuda")
    results = []
    for backend in ("flex", "sdpa"):
        model.zero_grad()
        base = model(x, attention=document_causal(doc, backend=backend), return_kv=True)
        blocks = model(x[:, :12], position_ids=(limits[:, None] + 1 + torch.arange(4, device="cuda")).flatten(),
                       prefix_kv=base.kv, attention=uniform_blocks(limits, 4, 64, backend=backend))
        (base.logits.square().mean() + blocks.logits.square().mean()).backward()
        results.append((base.logits, blocks.logits, [p.grad.clone() for p in model.parameters()]))
    (a0, b0, g0), (a1, b1, g1) = results
    torch.testing.assert_close(a0, a1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b0, b1, atol=1e-4, rtol=1e-4)
    for p0, p1 in zip(g0, g1, strict=True):
        torch.testing.assert_close(p0, p1, atol=1e-4, rtol=1e-3)
