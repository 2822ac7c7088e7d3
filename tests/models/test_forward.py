"""Forward semantics: prefix K/V, position ids, mask patterns through the model, checkpointing."""

from __future__ import annotations

import warnings

import pytest
import torch

from pipeline.attention import document_causal, uniform_blocks
from pipeline.errors import PipelineError
from pipeline.models import build_model, preset

FAMILIES = ["gpt2-tiny", "llama-tiny", "qwen3-tiny"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _model(name, seed=0):
    """Random weights with norm scales near 1: sharp attention, so mask or position errors show."""
    torch.manual_seed(seed)
    model = build_model(preset(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_norm = p.dim() == 1 and pname.endswith("weight") and ("norm" in pname or ".ln" in pname)
            p.normal_(1.0 if is_norm else 0.0, 0.1)
    return model


def _ids(b=2, t=64, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("custom_positions", [False, True])
def test_prefix_kv_equals_one_causal_pass(name, custom_positions):
    model, x, a = _model(name), _ids(), 23
    pos = torch.arange(64) * 2 + 1 if custom_positions else torch.arange(64)
    with torch.no_grad():
        full = model(x, position_ids=pos)
        first = model(x[:, :a], position_ids=pos[:a], return_kv=True)
        rest = model(x[:, a:], position_ids=pos[a:], prefix_kv=first.kv, return_kv=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full.logits, **TOL)
    cfg = model.config
    assert len(rest.kv) == cfg.n_layer
    assert rest.kv[0][0].shape == (2, cfg.n_kv_head, 64 - a, cfg.head_dim)  # own tokens only


@pytest.mark.parametrize("name", FAMILIES)
def test_inputs_embeds_and_hidden_states(name):
    model, x = _model(name), _ids()
    with torch.no_grad():
        by_ids = model(x)
        by_embeds = model(inputs_embeds=model.embed(x), return_logits=False)
    assert by_embeds.logits is None
    torch.testing.assert_close(by_embeds.hidden_states, by_ids.hidden_states)
    torch.testing.assert_close(model.lm_head(by_ids.hidden_states), by_ids.logits)
    with pytest.raises(PipelineError, match="exactly one"):
        model(x, inputs_embeds=model.embed(x))


@pytest.mark.parametrize("name", FAMILIES)
def test_document_mask_isolates_documents(name):
    """A packed row with a document mask equals each document run alone (same positions)."""
    model, x = _model(name), _ids(b=1)
    doc = (torch.arange(64) >= 40).long()
    with torch.no_grad():
        packed = model(x, attention=document_causal(doc)).logits
        alone = model(x[:, 40:], position_ids=torch.arange(40, 64)).logits
    torch.testing.assert_close(packed[:, 40:], alone, **TOL)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_blocks_after_prefix_equal_one_site_at_a_time(name, backend):
    """The dual model's decode pass in miniature: M blocks over one cache, each sees cache <= p_m."""
    model, x = _model(name), _ids(b=2)
    limits = torch.tensor([[5, 20, 41], [0, 33, 62]])  # p_m per row
    block = _ids(b=2, t=3 * 4, seed=1)  # (B, M*L) block tokens, L = 4
    block_pos = (limits[:, :, None] + 1 + torch.arange(4)).flatten(1)  # p_m + 1 + j
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile on CPU
        cache = model(x, return_kv=True).kv
        pattern = uniform_blocks(limits, 4, 64, backend=backend)
        packed = model(block, position_ids=block_pos, prefix_kv=cache, attention=pattern).logits
        for b in range(2):
            for m in range(3):
                p = limits[b, m].item()
                site_cache = model(x[b : b + 1, : p + 1], return_kv=True).kv
                sl = slice(4 * m, 4 * m + 4)
                naive = model(block[b : b + 1, sl], position_ids=block_pos[b, sl], prefix_kv=site_cache).logits
                torch.testing.assert_close(packed[b : b + 1, sl], naive, **TOL)


@pytest.mark.parametrize("name", ["gpt2-tiny", "qwen3-tiny"])
def test_activation_checkpointing_same_grads(name):
    x = _ids()
    grads = []
    for ckpt in (False, True):
        model = _model(name).train()
        model.activation_checkpointing = ckpt
        out = model(x, attention=document_causal((torch.arange(64) >= 30).long()))
        torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)


def test_prefix_layer_count_checked():
    model = _model("gpt2-tiny")
    kv = model(_ids(), return_kv=True).kv
    with pytest.raises(PipelineError, match="prefix_kv has 1 layers"):
        model(_ids(), prefix_kv=kv[:1])
