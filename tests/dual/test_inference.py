"""Batched inference: prompts of different lengths, each augmented at its own end, decode together
and give every row the tokens of the single-prompt path."""

from __future__ import annotations

import pytest
import torch

from pipeline.dual import DualConfig, DualModel, augment_and_generate
from pipeline.dual.inference import augment_and_generate_batch
from pipeline.models import build_model, preset

LENGTHS = (1, 3, 7, 12)
N_NEW = 10


def make(variant: str, family: str, **options) -> DualModel:
    torch.manual_seed(0)
    cfg = DualConfig(**{"variant": variant, "n_latents": 3, "n_ahead": 4, "n_sites": 2, **options})
    dual = DualModel(build_model(preset(family)), cfg, eos_id=0).eval()
    with torch.no_grad():  # larger weights: sharper distributions, no near-ties in the argmax
        for p in dual.parameters():
            p.mul_(4.0)
    return dual


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family", ["gpt2-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("variant,options", [
    ("liu", {}),
    ("liu", {"coprocessor_input": "last_hidden", "decode_reread": True}),
    ("h1", {}),
    ("pause", {"decode_reread": True}),
    ("soft_embedding", {}),
    ("continued_pretraining", {}),
])
def test_batched_augmentation_equals_single_prompt_path(variant, options, family):
    dual = make(variant, family, **options)
    rows = prompts()
    alone = [augment_and_generate(dual, torch.tensor([p]), max_new_tokens=N_NEW)[0].tolist() for p in rows]
    assert len({tuple(a) for a in alone}) == len(alone)  # rows differ: a padding mistake would show
    assert augment_and_generate_batch(dual, rows, max_new_tokens=N_NEW) == alone
    # EOS stops some row early, per-row budgets stop others
    eos = next(a[2] for a in alone if a[2] not in a[:2])
    budgets = [N_NEW, 4, N_NEW, 7]
    want = []
    for a, m in zip(alone, budgets, strict=True):
        a = a[:m]
        want.append(a[: a.index(eos) + 1] if eos in a else a)
    got = augment_and_generate_batch(dual, rows, max_new_tokens=budgets, eos_token_id=eos)
    assert got == want
    assert any(r[-1] == eos and len(r) < m for r, m in zip(got, budgets, strict=True))


def test_batched_augmentation_stop_sequence():
    dual = make("h1", "qwen3-tiny")
    rows = prompts(seed=3)
    alone = [augment_and_generate(dual, torch.tensor([p]), max_new_tokens=N_NEW)[0].tolist() for p in rows]
    seq = alone[0][3:5]
    got = augment_and_generate_batch(dual, rows, max_new_tokens=N_NEW, stop=[seq])
    for g, a in zip(got, alone, strict=True):
        ends = [n for n in range(2, len(a) + 1) if a[n - 2: n] == seq]
        assert g == a[: ends[0] if ends else len(a)]
    assert got[0][-2:] == seq
