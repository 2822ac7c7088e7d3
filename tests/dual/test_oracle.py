"""The naive oracle: the packed three-pass loss equals the per-site computation.

For every variant and option that changes the computation, on both families, the
packed loss (all M sites of every sequence at once, one masked call per pass) must
equal the mean over sites of the same thing done one site at a time with ordinary
causal attention: Base on x[:p+1], Coprocessor on that cache plus the soft tokens,
then the site's decode block. Losses to 1e-5, gradients of every trainable
parameter to 1e-4. The oracle (`pipeline.dual.reference`) shares no masking code with the packed path.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.attention import blocks
from pipeline.dual.config import DualConfig
from pipeline.dual.model import DualModel
from pipeline.dual.reference import naive_loss
from pipeline.models import build_model, preset

EOS = 0


CASES = {
    "liu": dict(variant="liu"),
    "liu-reread": dict(variant="liu", decode_reread=True),
    "liu-last-hidden": dict(variant="liu", coprocessor_input="last_hidden"),
    "liu-lora": dict(variant="liu", coprocessor_adapter="lora", lora_rank=4),
    "liu-scratch-ortho": dict(variant="liu", coprocessor_init="scratch", orthogonality_weight=0.3),
    "h1": dict(variant="h1"),
    "h1-last-hidden": dict(variant="h1", coprocessor_input="last_hidden"),
    "h2": dict(variant="h2"),
    "h2-lm-loss": dict(variant="h2", lm_loss_weight=0.5),
    "h2-docmask": dict(variant="h2", document_mask=True),
    "liu-vocab-draft-reread": dict(variant="liu", latent_readout="vocab", draft_loss_weight=0.5, decode_reread=True),
    "liu-last-hidden-draft": dict(variant="liu", coprocessor_input="last_hidden", draft_loss_weight=1.0),
    "h2-vocab-ortho": dict(variant="h2", latent_readout="vocab", orthogonality_weight=0.3),
    "soft_embedding": dict(variant="soft_embedding"),
    "soft_embedding-reread": dict(variant="soft_embedding", decode_reread=True),
    "pause": dict(variant="pause"),
    "pause-reread-docmask": dict(variant="pause", decode_reread=True, document_mask=True),
}
FAMILIES = ["gpt2-tiny", "qwen3-tiny"]
S = 24


def make(family: str, seed: int = 0, **options) -> DualModel:
    torch.manual_seed(seed)
    cfg = DualConfig(**{"n_latents": 3, "n_ahead": 3, "n_sites": 4, **options})
    return DualModel(build_model(preset(family)), cfg, eos_id=EOS)


def batch(dual: DualModel, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (2, S), generator=g)
    x[0, 9] = EOS  # a document boundary (used by the doc-masked cases)
    x[1, 15] = EOS
    return x


def edge_sites(dual: DualModel) -> torch.Tensor:
    """Adjacent sites, and the first and last allowed positions."""
    cfg = dual.config
    last = S - 1 - cfg.n_ahead
    return torch.tensor([[0, 1, 2, last], [0, 7, 8, last]])[:, : cfg.n_sites]


def assert_matches_oracle(dual: DualModel, x: torch.Tensor, sites: torch.Tensor) -> None:
    params = [(n, p) for n, p in dual.named_parameters() if p.requires_grad]
    assert params, "nothing trains"
    packed = dual(x, sites).loss
    naive = naive_loss(dual, x, sites)
    torch.testing.assert_close(packed, naive, atol=1e-5, rtol=0)
    g_packed = torch.autograd.grad(packed, [p for _, p in params])
    g_naive = torch.autograd.grad(naive, [p for _, p in params], allow_unused=True)
    for (name, _), gp, gn in zip(params, g_packed, g_naive, strict=True):
        assert gn is not None, f"{name} is trainable but the oracle does not use it"
        torch.testing.assert_close(gp, gn, atol=1e-4, rtol=0, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.fixture(params=["split", "dense"])
def cpu_attention(request, monkeypatch):
    """Run the site passes through one CPU attention path: two-part (prefix / own block)
    kernels, or one dense-mask kernel, whichever the size heuristic would pick."""
    for_limits = blocks.BlockLayout.for_limits.__func__

    def forced(cls, *args, **kwargs):
        return for_limits(cls, *args, **(kwargs | {"split": request.param == "split"}))

    monkeypatch.setattr(blocks.BlockLayout, "for_limits", classmethod(forced))
    return request.param


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_per_site(family, case, cpu_attention):
    dual = make(family, **CASES[case])
    x = batch(dual)
    assert_matches_oracle(dual, x, edge_sites(dual))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["liu", "h1", "soft_embedding"])
def test_single_site_single_ahead(family, variant):
    dual = make(family, variant=variant, n_sites=1, n_ahead=1)
    x = batch(dual)
    assert_matches_oracle(dual, x, torch.tensor([[S - 2], [5]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_sites(family, cpu_attention):
    dual = make(family, variant="h2", n_sites=6, document_mask=True, document_aware_sites=True)
    x = batch(dual)
    sites = dual.sample_sites(x, torch.Generator().manual_seed(3))
    assert_matches_oracle(dual, x, sites)


def test_oracle_detects_a_wrong_mask():
    """The comparison has teeth: letting blocks see one cache position too far breaks it."""
    dual = make("gpt2-tiny", variant="liu")
    x = batch(dual)
    sites = edge_sites(dual)
    packed = dual(x, sites).loss
    shifted = naive_loss(dual, x, sites + 0)  # same sites: equal
    torch.testing.assert_close(packed, shifted, atol=1e-5, rtol=0)
    import pipeline.dual.model as dm

    original = dm._site_blocks
    dm._site_blocks = lambda sites, *a, **k: original(sites + 1, *a, **k)
    try:
        leaky = dual(x, sites).loss
    finally:
        dm._site_blocks = original
    assert (leaky - packed).abs() > 1e-4
