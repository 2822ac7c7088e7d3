"""Greedy / sampled decoding with a KV cache (or, for checking, by recomputing every step).

The cache is just the per-layer K/V the model returns, fed back as `prefix_kv`:
prefill the prompt once, then each step runs one token over [cache ; token].
An initial `prefix_kv` (e.g. K/V injected by another model) sits in front of the
prompt; prompt positions continue after it unless `position_offset` says otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.models.base import CausalLM
from pipeline.models.layers import KV


def _pick(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> Tensor:
    """Next token `(B,)` from last-position logits `(B, V)`."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cat_kv(a: list[KV] | None, b: list[KV]) -> list[KV]:
    if a is None:
        return list(b)
    return [(torch.cat([ka, kb], dim=2), torch.cat([va, vb], dim=2)) for (ka, va), (kb, vb) in zip(a, b, strict=True)]


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: Tensor | None = None,
    *,
    max_new_tokens: int,
    inputs_embeds: Tensor | None = None,
    prefix_kv: list[KV] | None = None,
    position_offset: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue a prompt; returns the new tokens `(B, max_new_tokens)`.

    The prompt is `input_ids` `(B, T)` or `inputs_embeds` `(B, T, d)` (same length per
    row, no padding). temperature 0 = greedy; otherwise sample, optionally restricted
    to the top_k tokens / the top_p probability mass. Rows that emit `eos_token_id`
    are padded with it; decoding stops early when every row has. `use_cache=False`
    recomputes the whole sequence each step (the reference the cache is tested against).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise PipelineError("generate: give exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise PipelineError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = model.embed(input_ids) if input_ids is not None else inputs_embeds  # (B, T, d)
    b, t = prompt.shape[:2]
    p = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
    start = p if position_offset is None else position_offset
    device = prompt.device
    out = torch.full((b, max_new_tokens), eos_token_id if eos_token_id is not None else 0,
                     dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)

    seq = prompt  # the recompute path's growing input (B, T + i, d)
    res = model(inputs_embeds=prompt, position_ids=torch.arange(start, start + t, device=device),
                prefix_kv=prefix_kv, return_kv=use_cache)
    cache = _cat_kv(prefix_kv, res.kv) if use_cache else None
    for i in range(max_new_tokens):
        token = _pick(res.logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out[:, i] = token
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        emb = model.embed(token[:, None])  # (B, 1, d)
        pos = start + t + i
        if use_cache:
            res = model(inputs_embeds=emb, position_ids=torch.tensor([pos], device=device),
                        prefix_kv=cache, return_kv=True)
            cache = _cat_kv(cache, res.kv)
        else:
            seq = torch.cat([seq, emb], dim=1)
            res = model(inputs_embeds=seq, position_ids=torch.arange(start, pos + 1, device=device),
                        prefix_kv=prefix_kv)
    return out
