"""Inference with augmentation: the Coprocessor once at the end of the prompt, then decoding.

Exactly the training path for one site at p = the last prompt position: Base pass
on the prompt (the cache), pass 2 for that site, then the N_L slots (or, for h1,
the Coprocessor's K/V) and, with re-reading, x[p] again, after which ordinary
KV-cached decoding continues.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.dual.model import DualModel, cat_kv
from pipeline.models import generate


@torch.no_grad()
def augment_and_generate(dual: DualModel, prompt_ids: Tensor, *, max_new_tokens: int, **sampling) -> Tensor:
    """New tokens `(B, max_new_tokens)` after augmenting each prompt `(B, T)` at its end.

    `sampling`: `temperature` (0 = greedy), `top_k`, `top_p`, `eos_token_id`, `generator`.
    """
    if not dual.config.spec.augments:
        return generate(dual.base, prompt_ids, max_new_tokens=max_new_tokens, **sampling)
    B, T = prompt_ids.shape
    p = T - 1
    base_out = dual.base(prompt_ids, return_kv=True, return_logits=False)
    sites = torch.full((B, 1), p, dtype=torch.long, device=prompt_ids.device)
    latents, extra_kv = dual.slot_contents(sites, base_out.kv, base_out.hidden_states)
    last_tok = dual.base.embed(prompt_ids[:, p:])  # (B, 1, d)
    if extra_kv is not None:  # h1: re-read x[p] after the injected K/V
        prefix, inputs, first = cat_kv(base_out.kv, extra_kv), last_tok, p + 1 + dual.config.n_latents
    else:
        slots = latents[:, 0].to(last_tok.dtype)  # (B, N_L, d)
        inputs = torch.cat([slots, last_tok], dim=1) if dual.config.reread else slots
        prefix, first = base_out.kv, p + 1
    return generate(dual.base, inputs_embeds=inputs, prefix_kv=prefix, position_offset=first,
                    max_new_tokens=max_new_tokens, **sampling)
