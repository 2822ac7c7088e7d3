"""Generation with the KV cache produces the same tokens as recomputing the sequence each step;
prompts of different lengths batched together give each row the tokens it gets alone."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models import build_model, generate, preset
from pipeline.models.generate import generate_batch


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


# ------------------------------------------------------------------ batched, prompts of different lengths
LENGTHS = (1, 3, 7, 12)


def _prompts(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n):
    """The reference: one prompt, no cache, no padding."""
    return generate(model, torch.tensor([prompt]), max_new_tokens=n, use_cache=False)[0].tolist()


def _cut(tokens, eos, budget):
    """A free generation as a stopped row: up to and including the first EOS, at most budget tokens."""
    tokens = tokens[:budget]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen3-tiny"])
def test_batched_padded_equals_one_prompt_at_a_time(name):
    model, prompts = _model(name), _prompts()
    free = [_alone(model, p, 12) for p in prompts]
    assert len({tuple(f) for f in free}) == len(free)  # rows differ: padding mistakes would show
    # an EOS that some row emits early; budgets that end other rows first
    eos = next(f[3] for f in free if f[3] not in f[:3])
    budgets = [12, 5, 12, 9]
    rows = generate_batch(model, prompts, max_new_tokens=budgets, eos_token_id=eos)
    want = [_cut(f, eos, m) for f, m in zip(free, budgets, strict=True)]
    assert rows == want
    assert any(r[-1] == eos and len(r) < m for r, m in zip(rows, budgets, strict=True))  # stopped by EOS
    assert any(len(r) == m and eos not in r for r, m in zip(rows, budgets, strict=True))  # by its budget
    # a row with no budget stays empty, and one int budget applies to every row
    assert generate_batch(model, prompts, max_new_tokens=[0, 3, 3, 3])[0] == []
    assert generate_batch(model, prompts, max_new_tokens=4) == [f[:4] for f in free]


def _toy_decode(ids):
    """A toy tokenizer's decode: one letter per token."""
    return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_sequences_and_strings_end_a_row_where_they_complete():
    model, prompts = _model("qwen3-tiny"), _prompts(seed=2)
    free = [_alone(model, p, 16) for p in prompts]
    def first_end(row, found):
        """Length of the shortest prefix of `row` for which `found(prefix)` holds (else the row)."""
        return next((n for n in range(1, len(row) + 1) if found(row[:n])), len(row))

    # token sequences: row 2's tokens 5..6 (or an earlier occurrence of the same pair)
    seq = free[2][5:7]
    rows = generate_batch(model, prompts, max_new_tokens=16, stop=[seq, [999, 999]])
    for got, f in zip(rows, free, strict=True):
        assert got == f[: first_end(f, lambda t: t[-2:] == seq)]
    assert rows[2][-2:] == seq and len(rows[2]) <= 7
    # strings on the decoded text: row 1's characters 4..6; the completing token is kept
    s = _toy_decode(free[1])[4:7]
    rows = generate_batch(model, prompts, max_new_tokens=16, stop_strings=[s], decode=_toy_decode)
    for got, f in zip(rows, free, strict=True):
        assert got == f[: first_end(f, lambda t: s in _toy_decode(t))]
    assert s in _toy_decode(rows[1]) and s not in _toy_decode(rows[1][:-1])
    with pytest.raises(PipelineError, match="decode"):
        generate_batch(model, prompts, max_new_tokens=4, stop_strings=["x"])


def test_batched_sampling_equal_lengths_matches_generate():
    model = _model("gpt2-tiny")
    prompt = _prompt(b=3, t=6)
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.95)
    want = generate(model, prompt, generator=torch.Generator().manual_seed(3), **kw)
    got = generate_batch(model, prompt.tolist(), generator=torch.Generator().manual_seed(3), **kw)
    assert got == want.tolist()


def test_batched_generation_errors():
    model = _model("gpt2-tiny")  # 128 positions
    with pytest.raises(PipelineError, match="beyond the model's 128 positions"):
        generate_batch(model, [[1] * 4, [1] * 100], max_new_tokens=30)
    generate_batch(model, [[1] * 4, [1] * 100], max_new_tokens=[30, 29])  # the last fed position is 127
    with pytest.raises(PipelineError, match="empty"):
        generate_batch(model, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(PipelineError, match="one per row"):
        generate_batch(model, [[1, 2], [3]], max_new_tokens=[3])
