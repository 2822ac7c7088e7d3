"""Fast learning and the ELBO: the inner loop moves only (mu, logvar), the slow gradient is the
ELBO's at the final posterior, sequences never mix, the formulas match a hand computation,
the ELBO is a bound, and more inference steps help a trained model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipeline.ltm import (
    InferenceConfig,
    LTMDecoder,
    draw_noise,
    elbo_terms,
    infer,
    kl_to_prior,
    ltm_objective,
    ltm_preset,
    sequence_seeds,
)


def _model(seed: int = 0, **changes) -> LTMDecoder:
    torch.manual_seed(seed)
    cfg = ltm_preset("ltm-tiny", **({"vocab_size": 40, "d_model": 32, "n_head": 2, "d_ff": 64, "n_latents": 4,
                                     "window": 6} | changes))
    return LTMDecoder(cfg)


def _noise(dec: LTMDecoder, b: int, draws: int, seed: int = 0) -> torch.Tensor:
    return draw_noise(sequence_seeds(seed, 3, 0, 0, b), draws, dec.config.latent_shape)


def _snapshot(dec: LTMDecoder) -> tuple[dict, dict]:
    params = {n: p.detach().clone() for n, p in dec.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in dec.named_parameters()}
    return params, grads


def test_inner_loop_changes_only_the_posterior():
    dec = _model()
    x = torch.randint(0, 40, (3, 16))
    for i, p in enumerate(dec.parameters()):  # some gradients already there (mid-accumulation), some not
        if i % 2:
            p.grad = torch.randn_like(p)
    params, grads = _snapshot(dec)
    post = infer(dec, x, InferenceConfig(steps=5), _noise(dec, 3, 5))
    after_params, after_grads = _snapshot(dec)
    for name in params:
        assert torch.equal(params[name], after_params[name]), name
        assert (grads[name] is None and after_grads[name] is None) or torch.equal(grads[name], after_grads[name]), name
    assert post.mu.abs().sum() > 0 and not post.mu.requires_grad and not post.logvar.requires_grad


def _reference_grads(dec: LTMDecoder, x, post, eps) -> dict[str, torch.Tensor]:
    """d/d(decoder) of the batch's mean negative ELBO per token at the final posterior, fresh."""
    ref = copy.deepcopy(dec)
    ref.zero_grad(set_to_none=True)
    terms = elbo_terms(ref, x, post.mu, post.logvar, eps)
    ((terms.nll + terms.kl) / terms.tokens).mean().backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def test_slow_gradient_is_the_elbo_gradient_at_the_final_posterior():
    dec = _model()
    x = torch.randint(0, 40, (3, 16))
    noise = _noise(dec, 3, 5)
    loss, terms, post = ltm_objective(dec, x, InferenceConfig(steps=4), noise)
    loss.backward()
    ref = _reference_grads(dec, x, post, noise[4])
    for name, p in dec.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=0, atol=1e-7, msg=name)


def test_a_leaking_inner_loop_would_be_caught():
    """The check above has teeth: inner steps that call backward() (the public copy's bug) leave
    their gradients in the decoder and the slow gradient no longer matches."""
    dec = _model()
    x = torch.randint(0, 40, (3, 16))
    noise = _noise(dec, 3, 5)
    _, _, post = ltm_objective(dec, x, InferenceConfig(steps=4), noise)
    terms = elbo_terms(dec, x, post.mu.requires_grad_(), post.logvar.requires_grad_(), noise[0])
    (terms.nll.sum()).backward()  # what a leaking inner step does
    terms = elbo_terms(dec, x, post.mu.detach(), post.logvar.detach(), noise[4])
    ((terms.nll + terms.kl) / terms.tokens).mean().backward()
    ref = _reference_grads(dec, x, post, noise[4])
    assert any(not torch.allclose(p.grad, ref[n]) for n, p in dec.named_parameters())


def test_batched_inference_equals_each_sequence_alone():
    dec = _model()
    x = torch.randint(0, 40, (3, 16))
    seeds = sequence_seeds(7, 11, 0, 1, 3)
    cfg = InferenceConfig(steps=6)
    batched = infer(dec, x, cfg, draw_noise(seeds, 6, dec.config.latent_shape))
    for b in range(3):
        alone = infer(dec, x[b: b + 1], cfg, draw_noise(seeds[b: b + 1], 6, dec.config.latent_shape))
        torch.testing.assert_close(alone.mu[0], batched.mu[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.logvar[0], batched.logvar[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.elbo_last[0], batched.elbo_last[b], atol=1e-4, rtol=1e-6)


def test_noise_is_a_function_of_each_sequences_seed():
    seeds = sequence_seeds(1, 2, 3, 4, 3)
    assert len(set(seeds)) == 3 and seeds == sequence_seeds(1, 2, 3, 4, 3)
    assert sequence_seeds(1, 2, 3, 5, 1) != seeds[:1]  # another rank, other noise
    both = draw_noise(seeds, 4, (2, 3, 5))
    assert torch.equal(both[:, 2], draw_noise(seeds[2:], 4, (2, 3, 5))[:, 0])


def test_kl_matches_the_closed_form_of_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 5)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl_to_prior(mu, logvar), ref)
    assert torch.equal(kl_to_prior(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_elbo_matches_a_hand_computation():
    dec = _model()
    x = torch.randint(0, 40, (2, 9))
    torch.manual_seed(1)
    mu, logvar, eps = torch.randn(2, *dec.config.latent_shape), torch.randn(2, *dec.config.latent_shape), \
        torch.randn(2, *dec.config.latent_shape)
    terms = elbo_terms(dec, x, mu, logvar, eps)
    z = mu + torch.exp(logvar / 2) * eps
    with torch.no_grad():
        logits = dec(x, z).double()
    for b in range(2):
        log_px = sum(float(logits[b, t, x[b, t + 1]] - torch.logsumexp(logits[b, t], 0)) for t in range(8))
        kl = sum(0.5 * (m * m + math.exp(lv) - 1 - lv) for m, lv in zip(mu[b].flatten().tolist(),
                                                                       logvar[b].flatten().tolist(), strict=True))
        assert float(terms.nll[b].detach()) == pytest.approx(-log_px, rel=1e-5)
        assert float(terms.kl[b]) == pytest.approx(kl, rel=1e-5)
        assert float(terms.elbo[b]) == pytest.approx(log_px - kl, rel=1e-5)
    assert terms.tokens.tolist() == [8, 8]


def test_elbo_is_below_an_importance_sampled_log_likelihood():
    """log p(x) >= IS estimate with q as proposal (K samples) >= ELBO, up to Monte Carlo error."""
    dec = _model(vocab_size=12, d_model=16, n_head=2, n_layer=1, n_latents=2, d_ff=32)
    with torch.no_grad():  # make z matter: a larger cross-attention output
        dec.layers[0].cross_attn.o_proj.weight.mul_(50)
    x = torch.randint(0, 12, (1, 10))
    post = infer(dec, x, InferenceConfig(steps=10), _noise(dec, 1, 10))
    k = 4096
    torch.manual_seed(0)
    eps = torch.randn(k, *dec.config.latent_shape)
    mu, logvar = post.mu.expand(k, -1, -1, -1), post.logvar.expand(k, -1, -1, -1)
    with torch.no_grad():
        terms = elbo_terms(dec, x.expand(k, -1), mu, logvar, eps)
    z = mu + (0.5 * logvar).exp() * eps
    log_prior = Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    log_q = Normal(mu, (0.5 * logvar).exp()).log_prob(z).flatten(1).sum(1)
    log_w = -terms.nll + log_prior - log_q
    log_px = float(torch.logsumexp(log_w, 0) - math.log(k))
    recon = -terms.nll
    elbo = float(recon.mean() - terms.kl[0])
    stderr = float(recon.std() / math.sqrt(k))
    assert elbo <= log_px + 3 * stderr
    assert log_px - elbo > 0.01  # the bound is not trivially tight here (z matters)


# ---------------------------------------------------------------------- a trained tiny model
def _topic_batch(n: int, gen: torch.Generator, length: int = 24, vocab: int = 24, topic: int = 3) -> torch.Tensor:
    """Each sequence draws its tokens uniformly from its own random 3-token subset: a 2-token
    window cannot tell the subset, a latent can carry it."""
    rows = []
    for _ in range(n):
        subset = torch.randperm(vocab, generator=gen)[:topic]
        rows.append(subset[torch.randint(0, topic, (length,), generator=gen)])
    return torch.stack(rows)


def test_more_inference_steps_improve_the_held_out_elbo_of_a_trained_model():
    dec = _model(vocab_size=24, d_model=32, n_head=2, n_layer=1, n_latents=4, d_ff=64, window=2)
    # starting at the prior, with a gentler rate: a setting where the toy trains in seconds
    cfg = InferenceConfig(steps=4, lr=0.05, lr_end=0.057, init_logvar=0.0)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(150):
        x = _topic_batch(16, gen)
        loss, _, _ = ltm_objective(dec, x, cfg, draw_noise(sequence_seeds(0, step, 0, 0, 16), 5,
                                                           dec.config.latent_shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = _topic_batch(32, torch.Generator().manual_seed(99))
    bound = {}
    for t in (0, 4, 16):
        noise = draw_noise(sequence_seeds(5, 0, 0, 0, 32), t + 1, dec.config.latent_shape)
        post = infer(dec, held_out, cfg, noise, steps=t)
        with torch.no_grad():
            terms = elbo_terms(dec, held_out, post.mu, post.logvar, noise[t])
        bound[t] = float((terms.nll + terms.kl).sum() / terms.tokens.sum())
    assert bound[0] > bound[4] > bound[16], bound
