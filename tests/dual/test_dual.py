"""Dual-model behaviour beyond the oracle: what trains, scoring, export, inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.dual import (
    VARIANTS,
    DualConfig,
    DualModel,
    augment_and_generate,
    export_dual,
    load_dual,
    orthogonality_penalty,
)
from pipeline.errors import PipelineError
from pipeline.models import build_model, preset

EOS = 0
S = 32


def make(variant: str, family: str = "gpt2-tiny", seed: int = 0, **options) -> DualModel:
    torch.manual_seed(seed)
    cfg = DualConfig(**{"variant": variant, "n_latents": 3, "n_ahead": 4, "n_sites": 5, **options})
    return DualModel(build_model(preset(family)), cfg, eos_id=EOS)


def data(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(1, 256, (batch, S), generator=torch.Generator().manual_seed(seed))


def sites_for(dual: DualModel, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return dual.sample_sites(x, torch.Generator().manual_seed(seed))


def train_steps(dual: DualModel, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in dual.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        x = data(step)
        opt.zero_grad()
        dual(x, sites_for(dual, x, step)).loss.backward()
        opt.step()


# ------------------------------------------------------------------ what trains
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_frozen_parameters_get_no_gradient_and_do_not_move(variant):
    dual = make(variant)
    before = {n: p.detach().clone() for n, p in dual.named_parameters()}
    frozen = {n for n, p in dual.named_parameters() if not p.requires_grad}
    x = data()
    dual(x, sites_for(dual, x)).loss.backward()
    opt = torch.optim.AdamW([p for p in dual.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    opt.step()
    for name, p in dual.named_parameters():
        if name in frozen:
            assert p.grad is None, f"frozen {name} received a gradient"
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        else:
            assert p.grad is not None, f"trainable {name} got no gradient"
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"


def test_what_each_variant_trains():
    groups = {}
    for variant in VARIANTS:
        dual = make(variant)
        trains = lambda prefix, d=dual: any(p.requires_grad for n, p in d.named_parameters() if n.startswith(prefix))  # noqa: E731
        groups[variant] = (trains("base."), trains("coprocessor."), trains("soft_tokens"), dual.coprocessor is not None)
    assert groups == {
        "liu": (False, True, True, True),
        "h1": (False, True, True, True),
        "h2": (True, True, True, True),
        "soft_embedding": (True, False, True, False),
        "pause": (False, False, True, False),
        "continued_pretraining": (True, False, False, False),
    }
    assert tuple(make("pause").soft_tokens.weight.shape) == (1, 64)  # one embedding, repeated
    assert make("h1", freeze_base=False).config.train_base


def _final_norm(dual: DualModel) -> torch.nn.Module:
    return dual.coprocessor.final_norm


def test_h1_reads_coprocessor_kv_not_its_output():
    """Perturbing the Coprocessor's final norm leaves h1's loss alone but changes liu's."""
    x = data()
    for variant, should_change in [("h1", False), ("liu", True)]:
        dual = make(variant)
        sites = sites_for(dual, x)
        before = dual(x, sites).loss.detach()
        with torch.no_grad():
            _final_norm(dual).weight.mul_(1.7).add_(0.3)
        after = dual(x, sites).loss.detach()
        # h1's graph never reaches the final norm, so its loss is bitwise the same
        assert bool(after != before) == should_change, (variant, float(after - before))
    h1 = make("h1")
    assert not any(p.requires_grad for p in _final_norm(h1).parameters()), "h1's unused final norm must be frozen"


# ------------------------------------------------------------------ loss terms
def test_orthogonality_penalty():
    eye = torch.eye(64)[:3]  # 3 orthonormal rows in R^64
    assert orthogonality_penalty(eye[None, None]).item() == pytest.approx(0.0, abs=1e-7)
    assert orthogonality_penalty((eye * 5)[None]).item() == pytest.approx(0.0, abs=1e-6)  # row-normalised
    skew = eye.clone()
    skew[1, 0] = 0.5
    assert orthogonality_penalty(skew[None]).item() > 0.1
    with pytest.raises(PipelineError, match="orthogonality_weight"):
        DualConfig(variant="h1", orthogonality_weight=0.1)


@pytest.mark.parametrize("variant,options", [("h1", {"latent_readout": "vocab"}), ("soft_embedding", {"draft_loss_weight": 1.0}),
                                             ("pause", {"latent_readout": "vocab"})])
def test_readout_and_draft_options_need_coprocessor_output_slots(variant, options):
    with pytest.raises(PipelineError, match="Coprocessor's output"):
        DualConfig(variant=variant, **options)


def test_draft_loss_is_the_coprocessor_heads_cross_entropy_at_the_slots():
    """draft_loss = CE(head(Z_i), x[p+1+i]) over i < min(N_L, N_A), added with its weight; the
    vocab readout starts as the Base's token embeddings, so a one-hot draft reads as the token."""
    x = data()
    dual = make("liu", draft_loss_weight=0.25, latent_readout="vocab")
    sites = sites_for(dual, x)
    out = dual(x, sites)
    base_out = dual.base(x, return_kv=True, return_logits=False)
    _, _, z = dual.slots(sites, base_out.kv, base_out.hidden_states, None)
    j = min(dual.config.n_latents, dual.config.n_ahead)
    targets = x.gather(1, (sites.unsqueeze(-1) + 1 + torch.arange(j)).flatten(1))
    expected = torch.nn.functional.cross_entropy(dual.coprocessor.lm_head(z[:, :, :j]).flatten(0, 2), targets.flatten())
    torch.testing.assert_close(out.draft_loss, expected)
    torch.testing.assert_close(out.loss, out.ahead_loss + 0.25 * expected)
    onehot = torch.nn.functional.one_hot(torch.tensor([5, 7]), dual.base.config.vocab_size).float()
    torch.testing.assert_close(dual.latent_code(onehot), dual.base.embed(torch.tensor([5, 7])))


def test_lm_loss_weight_adds_exactly_the_causal_lm_loss():
    x = data()
    plain = make("h2")
    sites = sites_for(plain, x)
    weighted = make("h2", lm_loss_weight=0.7)
    logits = plain.base(x).logits
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(weighted(x, sites).loss, plain(x, sites).loss + 0.7 * lm, atol=1e-6, rtol=0)
    cp = make("continued_pretraining")
    torch.testing.assert_close(cp(x).loss, F.cross_entropy(cp.base(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))


# ------------------------------------------------------------------ scoring and export
@pytest.mark.parametrize("variant", ["liu", "h1", "pause"])
def test_scorer_equals_training_path_after_training(variant):
    dual = make(variant, family="qwen3-tiny")
    train_steps(dual)
    x = data(7)
    sites = sites_for(dual, x, 7)
    trained_nll = dual(x, sites).nll
    k = dual.config.n_ahead + 3  # beyond N_A: earlier columns must not change
    sites = sites.clamp(max=S - 1 - k)
    trained_nll = dual(x, sites).nll
    scored = dual.score_sites(x, sites, k)
    torch.testing.assert_close(scored[..., : dual.config.n_ahead], trained_nll, atol=1e-5, rtol=0)
    # without augmentation: the Base's own next-token NLL at the same targets
    plain = dual.score_sites(x, sites, k, augment=False)
    logp = dual.base(x).logits.log_softmax(-1)
    b, m, j = 1, 2, 4
    p = int(sites[b, m])
    assert plain[b, m, j].item() == pytest.approx(-logp[b, p + j, x[b, p + j + 1]].item(), abs=1e-5)


@pytest.mark.parametrize("variant,options", [("liu", {}), ("h1", {"decode_reread": True}),
                                             ("continued_pretraining", {})])
def test_greedy_flags_are_the_argmax_of_the_scored_logits(variant, options):
    """score_sites(greedy=True): the same NLL, and is_greedy = argmax of logits computed apart."""
    dual = make(variant, **options)
    train_steps(dual, steps=2)
    dual.eval()
    k = 6
    # Row 0 continues greedily from position 11, so that site's targets are all the argmax.
    prompt = data(5, batch=1)[:, :12]
    new = augment_and_generate(dual, prompt, max_new_tokens=k)
    x = data(6)
    x[0, : 12 + k] = torch.cat([prompt, new], dim=1)[0]
    sites = torch.tensor([[3, 11, 20], [2, 11, S - 1 - k]])
    targets = torch.stack([x[b, sites[b, :, None] + 1 + torch.arange(k)] for b in range(2)])  # (B, M, k)
    with torch.no_grad():
        base_out = dual.base(x, return_kv=True)
        alone = torch.stack([base_out.logits[b, sites[b, :, None] + torch.arange(k)] for b in range(2)])
        augmented = (dual.site_logits(x, sites, k, base_out.kv, base_out.hidden_states)[0]
                     if dual.config.spec.augments else alone)
    for augment, logits in [(True, augmented), (False, alone)]:
        nll, greedy = dual.score_sites(x, sites, k, augment=augment, greedy=True)
        assert torch.equal(nll, dual.score_sites(x, sites, k, augment=augment))
        assert torch.equal(greedy, logits.argmax(-1) == targets)
    _, greedy = dual.score_sites(x, sites, k, greedy=True)
    assert greedy[0, 1].all() and not greedy.all()


@pytest.mark.parametrize("variant", ["h2", "continued_pretraining"])
def test_base_alone_scores_are_the_base_forward_cross_entropy(variant):
    dual = make(variant, family="qwen3-tiny")
    train_steps(dual, steps=2)
    x = data(4)
    k = 7
    sites = torch.tensor([[0, 5, 9, 17, S - 1 - k], [2, 3, 11, 20, 21]])
    with torch.no_grad():
        ce = F.cross_entropy(dual.base(x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (B, S-1)
    expected = torch.stack([ce[b, sites[b, :, None] + torch.arange(k)] for b in range(2)])
    torch.testing.assert_close(dual.score_sites(x, sites, k, augment=False), expected, atol=1e-5, rtol=0)
    with pytest.raises(PipelineError, match="past the sequence end"):
        dual.score_sites(x, sites.clamp(min=S - k), k, augment=False)
    with pytest.raises(PipelineError, match="past the sequence end"):
        dual.score_sites(x, sites.clamp(min=S - k), k, greedy=True)


@pytest.mark.parametrize("variant,options", [
    ("liu", {"coprocessor_adapter": "lora", "lora_rank": 2}),
    ("h1", {}),
    ("soft_embedding", {"decode_reread": True}),
    ("pause", {}),
    ("h2", {"latent_readout": "vocab", "draft_loss_weight": 1.0}),
])
def test_export_import_gives_identical_scores(tmp_path, variant, options):
    from transformers import AutoModelForCausalLM

    dual = make(variant, family="qwen3-tiny", **options)
    train_steps(dual, steps=2)
    dual.eval()
    x = data(3)
    sites = sites_for(dual, x, 3)
    export_dual(dual, tmp_path / "export", run_config={"note": "test"})
    loaded = load_dual(tmp_path / "export")
    torch.testing.assert_close(loaded.score_sites(x, sites, 6), dual.score_sites(x, sites, 6), atol=1e-6, rtol=0)
    assert loaded.config.variant == variant and loaded.config.reread == dual.config.reread
    # the HF parts load in transformers and give our logits
    for part in ["base", "coprocessor"] if dual.coprocessor is not None else ["base"]:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / part).eval()
        ours = getattr(loaded, part)
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-4, rtol=0)
    with pytest.raises(PipelineError, match="already holds an export"):
        export_dual(dual, tmp_path / "export")


@pytest.mark.parametrize("variant,options", [("liu", {}), ("h1", {}), ("pause", {"decode_reread": True})])
def test_generation_matches_recomputed_site_logits(variant, options):
    """Greedy tokens after augmentation = argmax of the training path's logits, step by step."""
    dual = make(variant, **options)
    train_steps(dual, steps=2)
    prompt = data(5, batch=1)[:, :12]
    new = augment_and_generate(dual, prompt, max_new_tokens=6)
    seq = torch.cat([prompt, new, torch.zeros_like(new[:, :1])], dim=1)
    site = torch.tensor([[prompt.shape[1] - 1]])
    with torch.no_grad():
        base_out = dual.base(seq, return_kv=True, return_logits=False)
        logits, _ = dual.site_logits(seq, site, new.shape[1], base_out.kv, base_out.hidden_states)
    assert torch.equal(logits[0, 0].argmax(-1), new[0])


def test_unknown_variant_and_bad_sites_are_clear_errors():
    with pytest.raises(PipelineError, match="unknown variant"):
        DualConfig(variant="liu2")
    dual = make("liu", n_sites=40)
    with pytest.raises(PipelineError, match="allowed augmentation sites"):
        sites_for(dual, data())


@pytest.mark.parametrize("options", [{}, {"coprocessor_init": "scratch"}])
def test_a_base_in_another_dtype_gets_slots_and_coprocessor_in_it(options):
    """A Base already cast (bf16 on a GPU; float64 here) gets soft tokens and a fresh
    Coprocessor in its dtype, so the three passes run without a dtype mismatch."""
    torch.manual_seed(0)
    base = build_model(preset("gpt2-tiny")).to(torch.float64)
    dual = DualModel(base, DualConfig(variant="liu", n_latents=3, n_ahead=4, n_sites=5, **options), eos_id=EOS)
    assert {p.dtype for p in dual.parameters()} == {torch.float64}
    x = data()
    assert torch.isfinite(dual(x, sites_for(dual, x)).loss)
