"""Coconut's batched, KV-cached loss equals recomputing every thought from scratch per example.

The reference (`pipeline.coconut.reference`) runs one example at a time, one full causal
pass over [question ; <bot> ; thoughts so far] per thought, no cache, no padding. Losses to
1e-5, gradients of every parameter (markers included) to 1e-4, both families, questions
and answers of different lengths in one batch, at stage 0 (no thoughts), one thought, and
a last stage's count. Batched greedy decoding equals the per-example unbatched decode.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.coconut import CoconutLM
from pipeline.coconut import reference as ref
from pipeline.errors import PipelineError
from pipeline.models import build_model, preset
from pipeline.models.generate import right_pad

FAMILIES = ["gpt2-tiny", "qwen3-tiny"]
# (question, rest) lengths: the longest question has the shortest rest and vice versa, so
# pads sit both between a question and <bot> and after a rest; one rest is EOS alone
SHAPES = [(7, 4), (3, 9), (11, 1), (5, 6)]


def make(family: str, seed: int = 0) -> CoconutLM:
    torch.manual_seed(seed)
    model = CoconutLM(build_model(preset(family)))
    with torch.no_grad():  # markers apart from each other and from EOS's row
        model.markers.add_(torch.randn_like(model.markers) * 0.1)
    return model


def examples(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randint(1, 256, (q,), generator=g).tolist() for q, _ in SHAPES]
    rs = [torch.randint(1, 256, (r - 1,), generator=g).tolist() + [0] for _, r in SHAPES]  # ... + EOS
    return qs, rs


def batched_loss(model: CoconutLM, qs, rs, n: int) -> torch.Tensor:
    question, q_len = right_pad(qs)
    rest, rest_len = right_pad(rs)
    nll, count, _ = model(question, q_len, rest, rest_len, n)
    return nll / count


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [0, 1, 6])
def test_batched_loss_and_grads_equal_thoughts_recomputed_per_example(family, n):
    model = make(family)
    qs, rs = examples()
    params = [p for p in model.parameters() if p.requires_grad]
    fast = batched_loss(model, qs, rs, n)
    slow = ref.batch_loss(model.lm, model.markers, qs, rs, n)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    g_fast = torch.autograd.grad(fast, params)
    g_slow = torch.autograd.grad(slow, params, allow_unused=True)
    for (name, _), gf, gs in zip(model.named_parameters(), g_fast, g_slow, strict=True):
        assert gs is not None, name
        torch.testing.assert_close(gf, gs, atol=1e-4, rtol=0, msg=lambda m, k=name: f"grad of {k}: {m}")
    grads = dict(zip([k for k, _ in model.named_parameters()], g_fast, strict=True))
    # <bot> always shapes the answer; <eot> too; gradients reach them through the thoughts
    assert grads["markers"][0].abs().sum() > 0 and grads["markers"][1].abs().sum() > 0


def test_thoughts_are_the_previous_hidden_state_not_a_token():
    """Changing the model's hidden states changes the loss only through the thoughts at
    n > 0: the thoughts are really fed back (a check that the lockstep is not a no-op)."""
    model = make("gpt2-tiny")
    qs, rs = examples(1)
    with torch.no_grad():
        at0, at3 = batched_loss(model, qs, rs, 0), batched_loss(model, qs, rs, 3)
        per_example = [ref.example_nll(model.lm, model.markers, q, r, 3).sum() for q, r in zip(qs, rs, strict=True)]
    assert not torch.isclose(at0, at3)
    torch.testing.assert_close(at3, sum(per_example) / sum(len(r) for r in rs), atol=1e-5, rtol=0)


def test_per_token_nll_matches_reference_row_by_row():
    model = make("qwen3-tiny", seed=2)
    qs, rs = examples(2)
    question, q_len = right_pad(qs)
    rest, rest_len = right_pad(rs)
    with torch.no_grad():
        nll, _, mask = model.answer_nll(question, q_len, rest, rest_len, 4)
        for b, (q, r) in enumerate(zip(qs, rs, strict=True)):
            torch.testing.assert_close(nll[b, mask[b]], ref.example_nll(model.lm, model.markers, q, r, 4),
                                       atol=1e-5, rtol=0)
            assert (nll[b, ~mask[b]] == 0).all()


def test_score_answers_is_the_per_example_nll():
    """What a per-example NLL dump (`--dump-nll`) would write for a coconut export."""
    model = make("gpt2-tiny", seed=4).eval()
    qs, rs = examples(4)
    scored = model.score_answers(qs, rs, n_latents=2)
    for q, r, got in zip(qs, rs, scored, strict=True):
        with torch.no_grad():
            want = ref.example_nll(model.lm, model.markers, q, r, 2)
        assert len(got) == len(r)
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [0, 5])
def test_batched_greedy_equals_unbatched_decode_per_example(family, n):
    model = make(family, seed=3).eval()
    qs, _ = examples(3)
    rows = model.generate_batch(qs, n_latents=n, max_new_tokens=[6, 9, 4, 7], eos_token_id=None)
    for q, row, budget in zip(qs, rows, [6, 9, 4, 7], strict=True):
        assert row == ref.greedy(model.lm, model.markers, q, n, budget, None)


def test_bad_inputs_are_refused():
    model = make("gpt2-tiny")
    with pytest.raises(PipelineError, match="n_latents"):
        model.think(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), -1)
    with pytest.raises(PipelineError, match="markers"):
        CoconutLM(model.lm, torch.zeros(3, 64))
