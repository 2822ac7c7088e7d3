"""Generation with the KV cache produces the same tokens as recomputing the sequence each step."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models import build_model, generate, preset


def _model(name):
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    with torch.no_grad():  # larger weights: sharper, less tie-prone distributions
        for p in model.parameters():
            p.mul_(4.0)
    return model


def _prompt(b=2, t=9):
    return torch.randint(1, 256, (b, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen3-tiny"])
def test_greedy_cache_equals_recompute(name):
    model, prompt = _model(name), _prompt()
    cached = generate(model, prompt, max_new_tokens=20)
    recomputed = generate(model, prompt, max_new_tokens=20, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, recomputed)
    # and the greedy tokens really are the argmax of a full forward
    with torch.no_grad():
        full = model(torch.cat([prompt, cached], 1)).logits
    assert torch.equal(full[:, 8:-1].argmax(-1), cached)


@pytest.mark.parametrize("name", ["gpt2-tiny", "qwen3-tiny"])
def test_sampling_cache_equals_recompute(name):
    model, prompt = _model(name), _prompt()
    kw = dict(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)


def test_eos_pads_finished_rows():
    model, prompt = _model("gpt2-tiny"), _prompt()
    free = generate(model, prompt, max_new_tokens=10)
    eos = free[0, 3].item()
    out = generate(model, prompt, max_new_tokens=10, eos_token_id=eos)
    first = (free[0] == eos).nonzero()[0].item()
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first:] == eos).all()


def test_prefix_kv_and_embeds_prompt():
    """Decoding after injected K/V (the inference path of the dual model) agrees both ways."""
    model, prompt = _model("qwen3-tiny"), _prompt()
    with torch.no_grad():
        injected = model(_prompt(t=5), return_kv=True).kv
    embeds = model.embed(prompt).detach()
    kw = dict(inputs_embeds=embeds, prefix_kv=injected, max_new_tokens=12)
    assert torch.equal(generate(model, **kw), generate(model, use_cache=False, **kw))
    with pytest.raises(PipelineError):
        generate(model, prompt, inputs_embeds=embeds, max_new_tokens=3)
