"""The per-site reference: the three passes done one site at a time, no packing.

For each site p of each row: Base on x[:p+1] (from the start of p's document when
document-masked), Coprocessor on that cache plus the soft tokens, then the site's
decode block, each with the model core's ordinary causal attention over
[prefix ; own tokens]. It shares no masking code with the packed schedule in
`pipeline.dual.model`, which is why the tests hold the packed loss to it, and it
is the "loop" the dual-model benchmark compares the packed step against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.dual.model import DualModel, cat_kv, orthogonality_penalty


def naive_site_nll(dual: DualModel, row: torch.Tensor, p: int, n_a: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """NLL `(n_a,)` of row[p+1 .. p+n_a] after augmenting at p, the slot latents the Base read
    `(N_L, d)` (None for h1), and the draft NLL `(min(N_L, n_a),)` of the same tokens under the
    Coprocessor's head at the slots (None without a Coprocessor), by ordinary causal passes
    over this one site."""
    cfg = dual.config
    n_l, r, slots = cfg.n_latents, int(cfg.reread), cfg.spec.slots
    start = 0
    if cfg.document_mask:  # the site's document starts after the last EOS before p
        eos = (row[:p] == dual.eos_id).nonzero().flatten()
        start = int(eos[-1]) + 1 if len(eos) else 0
    ctx = row[None, start : p + 1]
    ctx_pos = torch.arange(start, p + 1)
    base = dual.base(ctx, position_ids=ctx_pos, return_kv=True, return_logits=False)
    cache = base.kv
    if dual.coprocessor is not None:
        cop_prefix = cache
        if cfg.coprocessor_input == "last_hidden":
            cop_prefix = dual.coprocessor(
                inputs_embeds=base.hidden_states, position_ids=ctx_pos, return_kv=True, return_logits=False,
            ).kv
        cop = dual.coprocessor(
            inputs_embeds=dual.slot_embeddings()[None], position_ids=torch.arange(p + 1, p + 1 + n_l),
            prefix_kv=cop_prefix, return_kv=True, return_logits=False,
        )
        z, cop_kv = cop.hidden_states[0], cop.kv
        j = min(n_l, n_a)
        draft = F.cross_entropy(dual.coprocessor.lm_head(z[:j]), row[p + 1 : p + 1 + j], reduction="none")
        if cfg.latent_readout == "vocab":  # the expected code row under the Coprocessor's distribution
            z = torch.softmax(dual.coprocessor.lm_head(z), dim=-1) @ dual.latent_code.weight.T
    else:
        z, draft = dual.slot_embeddings().expand(n_l, -1), None
    toks = dual.base.embed(row[p + 1 - r : p + n_a])  # (r + n_a - 1, d)
    if slots == "coprocessor_kv":  # h1: the Coprocessor's K/V join the cache
        prefix, inputs, first, z = cat_kv(cache, cop_kv), toks, p + 1 + n_l, None
    else:
        prefix, inputs, first = cache, torch.cat([z, toks]), p + 1
    out = dual.base(
        inputs_embeds=inputs[None], position_ids=torch.arange(first, first + len(inputs)), prefix_kv=prefix,
    )
    targets = row[p + 1 : p + 1 + n_a]
    return F.cross_entropy(out.logits[0, -n_a:], targets, reduction="none"), z, draft


def naive_loss(dual: DualModel, x: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """Mean over sites of the per-site three-pass loss, one site at a time."""
    cfg = dual.config
    terms, latents_all, drafts = [], [], []
    for b in range(x.shape[0]):
        for p in sites[b].tolist():
            nll, z, draft = naive_site_nll(dual, x[b], p, cfg.n_ahead)
            terms.append(nll)
            if z is not None:
                latents_all.append(z)
            drafts.append(draft)
    loss = torch.stack(terms).mean()
    if cfg.draft_loss_weight > 0:
        loss = loss + cfg.draft_loss_weight * torch.stack(drafts).mean()
    if cfg.orthogonality_weight > 0:
        loss = loss + cfg.orthogonality_weight * orthogonality_penalty(torch.stack(latents_all))
    if cfg.lm_loss_weight > 0:
        full = dual.base(x).logits
        loss = loss + cfg.lm_loss_weight * F.cross_entropy(full[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return loss
