"""Fast learning (posterior inference) and the ELBO of a Latent Thought Model (paper 003 §2.2).

    noise = draw_noise(sequence_seeds(seed, step, micro, rank, B), cfg.steps + 1, dec.config.latent_shape)
    post = infer(dec, input_ids, cfg, noise)                    # T_fast Adam steps per sequence
    terms = elbo_terms(dec, input_ids, post.mu, post.logvar, noise[-1])   # at the final posterior

Each sequence x_b has its own diagonal Gaussian q_b(z) = N(mu_b, exp(logvar_b)) over all its
latent vectors z = (z_1 .. z_L), prior N(0, I). Its ELBO, estimated with one reparameterised
sample z = mu + exp(logvar / 2) * eps:

    ELBO_b = log p(x_b | z) - KL(q_b || p),   KL = 1/2 sum(mu^2 + exp(logvar) - 1 - logvar)

where log p(x_b | z) sums the next-token log-probabilities of the sequence (S - 1 tokens).

Fast learning (Algorithm 1, lines 6-11): mu = 0, logvar = `init_logvar`, then `steps` Adam
updates of (mu, logvar) on each sequence's own negative ELBO per token, at a learning rate
going linearly from `lr` to `lr_end` over the steps (App. A.2: 0.3 rising to 0.34). Three
properties the tests hold it to:

- Only (mu, logvar) move. Gradients come from `torch.autograd.grad(objective, (mu, logvar))`,
  which neither writes nor accumulates into any parameter's `.grad` (and skips the weight
  gradients' work), so the decoder and its gradients are untouched; the decoder is never
  stepped here. (A `loss.backward()` here would leak T_fast extra gradients into the decoder.)
- Sequences never mix. The objective is a sum of per-sequence terms, so d objective /
  d mu_b depends on sequence b alone; Adam's moments are element-wise tensors of the same
  (B, ...) shape; the step count, and so the bias correction, is shared and data-free.
- The noise of sequence b is drawn from its own generator (`draw_noise`), seeded by
  (seed, step, micro-step, rank, b): resuming at a step redraws the same noise, and a
  sequence's result does not depend on which others share its batch.

Slow learning (lines 13-15) is the caller's: the batch ELBO at the final (mu, logvar),
differentiated with respect to the decoder only (mu and logvar come back detached).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.ltm.model import next_token_targets


@dataclasses.dataclass
class InferenceConfig:
    """Fast learning of the per-sequence posteriors (training and evaluation)."""

    steps: int = 16
    """T_fast: Adam steps on (mu, logvar) per batch (paper: 16 for LTM-Small/Medium)."""
    lr: float = 0.3
    """Fast learning rate at the first step (paper App. A.2: 0.3)."""
    lr_end: float = 0.34
    """Fast learning rate at the last step, reached linearly (paper: 0.34)."""
    init_logvar: float = -5.0
    """log sigma^2 every posterior starts from (mu starts at 0). The paper gives no value; the
    public reimplementation starts near -5, which pairs with the fast rate: 16 steps of ~0.3
    can carry log sigma^2 back to ~0. z then starts almost deterministic (sigma = 0.08), so
    mu's first gradients are not drowned by sampling noise; the price is a large KL at T = 0
    (about 2 nats per latent dimension). 0 starts at the prior (no KL at T = 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates for (mu, logvar) (torch's defaults; the paper's fast Adam has
    no other stated settings)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise PipelineError(f"inference.steps={self.steps} must be >= 0")
        if self.lr <= 0 or self.lr_end <= 0:
            raise PipelineError("inference.lr and inference.lr_end must be > 0")
        self.betas = tuple(self.betas)

    def lr_at(self, t: int, steps: int) -> float:
        """The fast learning rate of inner step t (0-based) of `steps`."""
        return self.lr if steps <= 1 else self.lr + (self.lr_end - self.lr) * t / (steps - 1)


@dataclasses.dataclass
class Posterior:
    """The fitted per-sequence posteriors and the ELBO trace of the inner loop."""

    mu: Tensor
    """(B, L, n_l, d), float32, detached."""
    logvar: Tensor
    """(B, L, n_l, d), float32, detached."""
    elbo_first: Tensor | None = None
    """(B,) ELBO (nats per sequence) at the first inner step, before any update."""
    elbo_last: Tensor | None = None
    """(B,) ELBO at the last inner step (before its update)."""


@dataclasses.dataclass
class ElboTerms:
    nll: Tensor
    """(B,) -log p(x_b | z), summed over the sequence's predicted tokens."""
    kl: Tensor
    """(B,) KL(q_b || N(0, I)), closed form."""
    tokens: Tensor
    """(B,) predicted tokens per sequence."""

    @property
    def elbo(self) -> Tensor:
        """(B,) the ELBO of each sequence in nats."""
        return -(self.nll + self.kl)


def kl_to_prior(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row `(B,)`, summed over all other dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def sequence_seeds(seed: int, step: int, micro_step: int, rank: int, n: int) -> list[int]:
    """One 63-bit seed per sequence of a micro-batch, a function of (seed, step, micro, rank, row)."""
    return [int(np.random.SeedSequence([seed, step, micro_step, rank, row]).generate_state(2, np.uint64)[0] >> 1)
            for row in range(n)]


def draw_noise(seeds: list[int], n_draws: int, latent_shape: tuple[int, ...],
               device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise `(n_draws, B, *latent_shape)`: row b from its own generator
    `seeds[b]` (drawn on the CPU, so every device sees the same numbers)."""
    rows = [torch.randn((n_draws, *latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows, dim=1).to(device)


def elbo_terms(decoder: nn.Module, input_ids: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor,
               targets: Tensor | None = None) -> ElboTerms:
    """The ELBO's two terms per sequence with the sample z = mu + exp(logvar / 2) * eps."""
    targets = next_token_targets(input_ids) if targets is None else targets
    z = mu + (0.5 * logvar).exp() * eps
    nll = decoder(input_ids, z, targets=targets)
    return ElboTerms(nll=nll, kl=kl_to_prior(mu, logvar), tokens=(targets != -100).sum(dim=1))


def infer(decoder: nn.Module, input_ids: Tensor, cfg: InferenceConfig, noise: Tensor, *,
          steps: int | None = None, latent_shape: tuple[int, ...] | None = None) -> Posterior:
    """Fit each sequence's (mu, logvar) by `steps` (default cfg.steps) Adam steps on its own
    negative ELBO per token, using noise[t] `(B, *latent_shape)` at step t. The decoder's
    parameters and `.grad` are left exactly as they were."""
    steps = cfg.steps if steps is None else steps
    if noise.shape[0] < steps:
        raise PipelineError(f"infer: {steps} steps need {steps} noise draws, got {noise.shape[0]}")
    shape = noise.shape[1:] if latent_shape is None else (input_ids.shape[0], *latent_shape)
    mu = torch.zeros(shape, device=input_ids.device)
    logvar = torch.full(shape, cfg.init_logvar, device=input_ids.device)
    if steps == 0:
        return Posterior(mu=mu, logvar=logvar)
    targets = next_token_targets(input_ids)
    moments = [torch.zeros_like(mu) for _ in range(4)]  # m_mu, v_mu, m_logvar, v_logvar: per element
    b1, b2 = cfg.betas
    first = last = None
    for t in range(steps):
        with torch.enable_grad():
            leaves = (mu.requires_grad_(True), logvar.requires_grad_(True))
            terms = elbo_terms(decoder, input_ids, *leaves, noise[t], targets)
            per_token = (terms.nll + terms.kl) / terms.tokens.clamp(min=1)  # (B,) each row's own objective
            grads = torch.autograd.grad(per_token.sum(), leaves)  # only (mu, logvar): no parameter .grad
        elbo = terms.elbo.detach()
        first = elbo if first is None else first
        last = elbo
        lr = cfg.lr_at(t, steps)
        with torch.no_grad():
            mu, logvar = mu.detach(), logvar.detach()
            for x, g, m, v in ((mu, grads[0], moments[0], moments[1]), (logvar, grads[1], moments[2], moments[3])):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
                x.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
    return Posterior(mu=mu.detach(), logvar=logvar.detach(), elbo_first=first, elbo_last=last)


def ltm_objective(decoder: nn.Module, input_ids: Tensor, cfg: InferenceConfig, noise: Tensor, *,
                  steps: int | None = None, inner: nn.Module | None = None) -> tuple[Tensor, ElboTerms, Posterior]:
    """One training micro-batch: fast learning, then the slow objective at the final posterior
    (mean over sequences of the negative ELBO per token; its gradient reaches the decoder only).
    `noise` holds steps + 1 draws: one per inner step and one for the slow step.

    `inner` is the module the inner loop runs (default `decoder`). Under DeepSpeed, pass the
    engine as `decoder` and the bare module as `inner`: the engine's forward hooks its outputs
    so that *any* backward through them runs ZeRO's gradient reduction epilogue, which an
    inner-loop `autograd.grad` must not trigger."""
    steps = cfg.steps if steps is None else steps
    post = infer(decoder if inner is None else inner, input_ids, cfg, noise, steps=steps)
    terms = elbo_terms(decoder, input_ids, post.mu, post.logvar, noise[steps])
    loss = ((terms.nll + terms.kl) / terms.tokens.clamp(min=1)).mean()
    return loss, terms, post
