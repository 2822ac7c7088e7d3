"""Augmentation-site sampling: M sorted positions per packed sequence.

A site p is allowed when its N_A targets x[p+1 .. p+N_A] lie inside the sequence
and every position id its decode block uses (up to p + N_L + N_A - 1, one more with
re-reading) stays below the model's maximum. With document-aware sampling a site
is also refused when x[p .. p+N_A-1] holds an EOS, i.e. when its targets would run
into the next document.
"""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def last_allowed_site(seq_len: int, n_latents: int, n_ahead: int, reread: bool, max_positions: int) -> int:
    """The largest allowed site position (sites run from 0 to this, inclusive)."""
    by_targets = seq_len - 1 - n_ahead
    by_positions = max_positions - n_latents - n_ahead - int(reread)
    return min(by_targets, by_positions)


def allowed_sites(
    input_ids: torch.Tensor,
    *,
    n_latents: int,
    n_ahead: int,
    reread: bool,
    max_positions: int,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Boolean mask `(B, S)` of positions that may carry a site."""
    B, S = input_ids.shape
    last = last_allowed_site(S, n_latents, n_ahead, reread, max_positions)
    allowed = torch.zeros(B, S, dtype=torch.bool, device=input_ids.device)
    if last < 0:
        return allowed
    allowed[:, : last + 1] = True
    if eos_id is not None:
        # A window of n_ahead tokens starting at p must hold no EOS.
        is_eos = (input_ids == eos_id).to(torch.int32)
        csum = torch.nn.functional.pad(is_eos.cumsum(dim=1), (1, 0))  # (B, S+1)
        window = torch.zeros_like(allowed, dtype=torch.int32)
        n = S - n_ahead + 1
        window[:, :n] = csum[:, n_ahead : n_ahead + n] - csum[:, :n]
        allowed &= window == 0
    return allowed


def sample_sites(
    input_ids: torch.Tensor,
    n_sites: int,
    *,
    n_latents: int,
    n_ahead: int,
    reread: bool,
    max_positions: int,
    generator: torch.Generator,
    eos_id: int | None = None,
) -> torch.Tensor:
    """`(B, M)` sorted, distinct site positions, drawn uniformly from the allowed ones.

    Seeded by `generator` (a CPU generator, so the draw is the same on any device).
    """
    allowed = allowed_sites(
        input_ids, n_latents=n_latents, n_ahead=n_ahead, reread=reread,
        max_positions=max_positions, eos_id=eos_id,
    ).cpu()
    counts = allowed.sum(dim=1)
    if int(counts.min()) < n_sites:
        raise PipelineError(
            f"a sequence of length {input_ids.shape[1]} has only {int(counts.min())} allowed "
            f"augmentation sites but n_sites={n_sites} were asked for (n_latents={n_latents}, "
            f"n_ahead={n_ahead}, max_positions={max_positions}"
            f"{', document-aware' if eos_id is not None else ''}); lower n_sites or n_ahead, "
            "or use longer sequences"
        )
    scores = torch.rand(allowed.shape, generator=generator)
    scores[~allowed] = -1.0
    sites = scores.topk(n_sites, dim=1).indices.sort(dim=1).values
    return sites.to(input_ids.device)
