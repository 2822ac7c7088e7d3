"""Inference with augmentation: the Coprocessor once at the end of the prompt, then decoding.

Exactly the training path for one site at p = the last prompt position: Base pass
on the prompt (the cache), pass 2 for that site, then the N_L slots (or, for h1,
the Coprocessor's K/V) and, with re-reading, x[p] again, after which ordinary
KV-cached decoding continues.

Prompts of different lengths go through as one batch, right-padded: each row's
tokens keep positions 0..len-1, and its site is its own last token, so passes 1
and 2 are the training passes with one site per row (a site's slots never see
cache slots past it, the pads included). Decoding then hides the pad slots
(`pipeline.models.generate.continue_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.dual.model import DualModel, cat_kv
from pipeline.dual.sites import last_allowed_site
from pipeline.errors import PipelineError
from pipeline.models import KV, generate
from pipeline.models.generate import continue_batch, generate_batch, right_pad


def _augment(dual: DualModel, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, list[KV], Tensor | None]:
    """Passes 1 and 2 at each row's last token, for right-padded prompts `(B, T)` of `lengths`.

    Returns what decoding starts from: inputs `(B, n, d)` (the slots, then x[p] when
    re-reading; for h1 x[p] alone), their position ids `(B, n)`, the prefix K/V (the
    Base cache, plus h1's injected K/V) and which prefix slots are real `(B, P)`
    (None when no row is padded).
    """
    cfg = dual.config
    B, T = ids.shape
    p = lengths - 1  # (B,) each row's site: its last prompt token
    limit = dual.base.config.max_position_embeddings
    last = last_allowed_site(1 << 62, cfg.n_latents, 1, cfg.reread, limit)  # room for the slots + 1 new token
    if int(p.max()) > last:
        raise PipelineError(f"generate: a prompt of {int(lengths.max())} tokens does not fit the model's {limit} "
                            f"positions with its {cfg.n_latents} latent slots and a new token (at most {last + 1} "
                            "prompt tokens); shorten the prompt")
    base_out = dual.base(ids, return_kv=True, return_logits=False)
    latents, extra_kv = dual.slot_contents(p[:, None], base_out.kv, base_out.hidden_states)
    last_tok = dual.base.embed(ids.gather(1, p[:, None]))  # (B, 1, d)
    valid = torch.arange(T, device=ids.device)[None] < lengths[:, None]  # (B, T)
    if extra_kv is not None:  # h1: re-read x[p] after the injected K/V
        prefix, inputs, first = cat_kv(base_out.kv, extra_kv), last_tok, p + 1 + cfg.n_latents
        valid = torch.cat([valid, valid.new_ones(B, cfg.n_latents)], dim=1)
    else:
        slots = latents[:, 0].to(last_tok.dtype)  # (B, N_L, d)
        inputs = torch.cat([slots, last_tok], dim=1) if cfg.reread else slots
        prefix, first = base_out.kv, p + 1
    positions = first[:, None] + torch.arange(inputs.shape[1], device=ids.device)  # (B, n)
    return inputs, positions, prefix, None if bool(valid.all()) else valid


@torch.no_grad()
def augment_and_generate(dual: DualModel, prompt_ids: Tensor, *, max_new_tokens: int, **sampling) -> Tensor:
    """New tokens `(B, max_new_tokens)` after augmenting each prompt `(B, T)` at its end.

    `sampling`: `temperature` (0 = greedy), `top_k`, `top_p`, `eos_token_id`, `generator`.
    """
    if not dual.config.spec.augments:
        return generate(dual.base, prompt_ids, max_new_tokens=max_new_tokens, **sampling)
    B, T = prompt_ids.shape
    lengths = torch.full((B,), T, device=prompt_ids.device)
    inputs, positions, prefix, _ = _augment(dual, prompt_ids, lengths)
    return generate(dual.base, inputs_embeds=inputs, prefix_kv=prefix, position_offset=int(positions[0, 0]),
                    max_new_tokens=max_new_tokens, **sampling)


@torch.no_grad()
def augment_and_generate_batch(dual: DualModel, prompts: Sequence[Sequence[int]], *,
                               max_new_tokens: int | Sequence[int], **options) -> list[list[int]]:
    """New tokens of each prompt (lists of ids, any lengths), each augmented once at its own end.

    Row by row the same tokens as `augment_and_generate` on that prompt alone (greedy).
    `options`: as `pipeline.models.generate.generate_batch` (`eos_token_id`, `stop`,
    `stop_strings` + `decode`, `temperature`, `top_k`, `top_p`, `generator`).
    """
    if not dual.config.spec.augments:
        return generate_batch(dual.base, prompts, max_new_tokens=max_new_tokens, **options)
    ids, lengths = right_pad(prompts, next(dual.parameters()).device)
    inputs, positions, prefix, valid = _augment(dual, ids, lengths)
    return continue_batch(dual.base, inputs, positions, prefix_kv=prefix, prefix_valid=valid,
                          max_new_tokens=max_new_tokens, **options)
