"""Why do (or don't) latents help? Scales, gradients and ablations of one dual export.

    python launchers/evaluate.py probe --model runs/default/liu/export [--sequences 64] [--out DIR]

For a model whose latents enter the Base as input embeddings (liu, h2, soft_embedding,
pause), on held-out sequences with seeded sites, in fp32 without DeepSpeed:

- **scales**: the mean norm of each latent slot's vector against the Base's token
  embeddings (all rows, and the tokens that occur) and its input (token + position);
- **gradients**: the norm of the ahead loss's gradient for each trainable group
  (Coprocessor, soft tokens, Base), i.e. how much signal reaches each part;
- **ablations**: the ahead NLL per k with the learned latents, with zeros, with the
  batch mean of the latents (same scale, no site-specific information), with random
  token embeddings, and with *oracle* latents — the embeddings of the true next N_L
  tokens (and, with `latent_readout: vocab`, their rows of the trained code C: a perfect
  draft through this model's readout), roughly what the frozen Base can read from N_L
  inserted positions —
  next to the Base alone on the same targets; also with each site's latents swapped for
  another site's (a seeded permutation);
- **the Coprocessor's own draft** (liu, h2): the NLL of x[p+1+j] under the Coprocessor's head
  at slot j, next to the Base alone at k = j+1 — whether the Coprocessor knows anything about
  the ahead tokens that the Base does not.

Learned ≈ mean ≈ swapped says the latents carry no per-site information; oracle ≈ Base alone
says the Base cannot use inserted positions at all, whatever a Coprocessor writes there; a
draft far above the Base alone says the Coprocessor has little to tell it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.dual import DualModel
from pipeline.dual.model import site_targets
from pipeline.errors import PipelineError


@dataclasses.dataclass
class ProbeConfig:
    sequences: int = 64
    """Held-out sequences (of the run's seq_len) to probe."""
    seq_len: int = 64
    seed: int = 0
    """Seeds the sites and the random-token ablation."""


def probe(dual: DualModel, input_ids: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """The scales, gradients and ablations above for `dual` on a batch `(B, S)`."""
    cfg, spec = dual.config, dual.config.spec
    if not spec.augments:
        raise PipelineError(f"probe needs a model with latents; variant {cfg.variant!r} has none")
    gen = torch.Generator().manual_seed(seed)
    sites = dual.sample_sites(input_ids, gen)
    n_l, n_a = cfg.n_latents, cfg.n_ahead
    table = _token_table(dual)
    used = torch.unique(input_ids)
    out: dict[str, Any] = {"variant": cfg.variant, "n_latents": n_l, "n_ahead": n_a, "n_sites": int(sites.numel()),
                           "scales": {"token_embedding_norm_all": float(table.norm(dim=-1).mean()),
                                      "token_embedding_norm_used": float(table[used].norm(dim=-1).mean()),
                                      "base_input_norm": float(dual.base.embed(input_ids).norm(dim=-1).mean())}}
    # gradients of the ahead loss, per trainable group
    dual.train()
    params = {n: p for n, p in dual.named_parameters() if p.requires_grad}
    loss = dual(input_ids, sites).ahead_loss
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    groups: dict[str, float] = {}
    for name, g in zip(params, grads, strict=True):
        if g is not None:
            group = name.split(".")[0]
            groups[group] = groups.get(group, 0.0) + float(g.pow(2).sum())
    out["grad_norm"] = {k: v ** 0.5 for k, v in groups.items()}
    dual.eval()
    with torch.no_grad():
        base_out = dual.base(input_ids, return_kv=True, return_logits=False)
        latents, extra_kv, z = dual.slots(sites, base_out.kv, base_out.hidden_states, None)
        targets = site_targets(input_ids, sites, n_a)
        B, M = sites.shape

        def nll(lat: torch.Tensor | None, kv=None) -> list[float]:
            logits = dual.decode_logits(input_ids, sites, n_a, base_out.kv, lat, kv)
            per = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
            return per.view(B, M, n_a).mean((0, 1)).tolist()

        rows = {"base alone": dual.score_sites(input_ids, sites, k=n_a, augment=False).mean((0, 1)).tolist(),
                "learned latents": nll(latents, extra_kv)}
        if latents is not None:
            out["scales"]["latent_norm_per_slot"] = latents.norm(dim=-1).mean((0, 1)).tolist()
            truth = input_ids.gather(1, (sites.unsqueeze(-1) + 1 + torch.arange(n_l)).clamp(
                max=input_ids.shape[1] - 1).flatten(1)).view(B, M, n_l)
            rand = torch.randint(0, table.shape[0], (B, M, n_l), generator=gen)
            rows |= {"zero latents": nll(torch.zeros_like(latents)),
                     "batch-mean latents": nll(latents.mean((0, 1), keepdim=True).expand_as(latents)),
                     "site-swapped latents": nll(_swap_sites(latents, gen)),
                     "random token embeddings": nll(table[rand]),
                     "oracle: true next tokens": nll(table[truth])}
            if dual.latent_code is not None:  # latent_readout: vocab; a perfect draft through the trained code
                rows["oracle through the code: C[true next tokens]"] = nll(dual.latent_code.weight.T.float()[truth])
        if z is not None and spec.slots == "coprocessor_output":
            out["draft_nll_per_slot"] = dual.draft_nll(z, input_ids, sites).float().mean((0, 1)).tolist()
    out["nll_per_k"] = rows
    out["delta_vs_base"] = {k: float(np.mean(v) - np.mean(rows["base alone"])) for k, v in rows.items()}
    return out


def _swap_sites(latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`latents` `(B, M, N_L, d)` with the sites' slot groups permuted among all B·M sites."""
    flat = latents.flatten(0, 1)
    return flat[torch.randperm(flat.shape[0], generator=gen)].view_as(latents)


def _token_table(dual: DualModel) -> torch.Tensor:
    """The Base's input embedding rows (token part only), `(V, d)`."""
    base = dual.base
    for module in base.modules():
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == base.config.vocab_size:
            return module.weight.detach()
    raise PipelineError("the Base has no token embedding table")


def markdown(result: dict[str, Any]) -> str:
    """The ablation table plus scales and gradients, for people."""
    k = result["n_ahead"]
    head = ["latents"] + [f"NLL k={i + 1}" for i in range(k)] + ["Δ mean vs Base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, values in result["nll_per_k"].items():
        lines.append("| " + " | ".join([name, *(f"{v:.4f}" for v in values),
                                         f"{result['delta_vs_base'][name]:+.4f}"]) + " |")
    draft = result.get("draft_nll_per_slot")
    if draft:
        base = result["nll_per_k"]["base alone"]
        lines += ["", "Coprocessor's own head at slot j, NLL of x[p+1+j]: " + ", ".join(f"{v:.4f}" for v in draft)
                  + " (Base alone at k = j+1: " + ", ".join(f"{v:.4f}" for v in base[: len(draft)]) + ")"]
    s = result["scales"]
    lines += ["", "scales (mean L2 norm): " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} [{', '.join(f'{x:.2f}' for x in v)}]"
        for k, v in s.items()),
        "gradient norm of the ahead loss: " + ", ".join(f"{k} {v:.4g}" for k, v in result["grad_norm"].items())]
    return "\n".join(lines) + "\n"
