"""Coconut done the slow, obvious way: one example at a time, every thought recomputed from scratch.

For thought j the model runs one ordinary causal pass (no cache, no padding, no mask
beyond causal, default positions 0..T-1) over [question ; <bot> ; t_1 .. t_{j-1}] and
takes the last hidden state. The answer side is scored by one more full pass over
[question ; <bot> ; t_1 .. t_n ; <eot> ; rest]. It shares nothing with the batched,
KV-cached path of `pipeline.coconut.model` but the model and its two marker rows, so the
tests can hold that path to it (losses and gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models import CausalLM
from pipeline.models.generate import generate


def prefix_embeddings(lm: CausalLM, markers: Tensor, question: Sequence[int], n_latents: int) -> Tensor:
    """[question ; <bot> ; t_1 .. t_n ; <eot>] as input embeddings `(1, q + n + 2, d)`."""
    dev = markers.device
    seq = torch.cat([lm.embed(torch.tensor([list(question)], device=dev)), markers[0].view(1, 1, -1)], dim=1)
    for _ in range(n_latents):
        h = lm(inputs_embeds=seq, return_logits=False).hidden_states  # a full pass, from scratch
        seq = torch.cat([seq, h[:, -1:]], dim=1)
    return torch.cat([seq, markers[1].view(1, 1, -1)], dim=1)


def example_nll(lm: CausalLM, markers: Tensor, question: Sequence[int], rest: Sequence[int],
                n_latents: int) -> Tensor:
    """Per-token NLL `(len(rest),)` of `rest` after the question, <bot>, thoughts and <eot>."""
    prefix = prefix_embeddings(lm, markers, question, n_latents)
    rest_ids = torch.tensor([list(rest)], device=markers.device)
    seq = torch.cat([prefix, lm.embed(rest_ids)], dim=1)
    logits = lm(inputs_embeds=seq).logits[0]  # (T, V)
    start = prefix.shape[1] - 1  # <eot> predicts rest[0]
    return F.cross_entropy(logits[start: start + len(rest)].float(), rest_ids[0], reduction="none")


def batch_loss(lm: CausalLM, markers: Tensor, questions: Sequence[Sequence[int]], rests: Sequence[Sequence[int]],
               n_latents: int) -> Tensor:
    """Token-mean NLL over every example's rest (what the training task back-propagates)."""
    total = sum(example_nll(lm, markers, q, r, n_latents).sum() for q, r in zip(questions, rests, strict=True))
    return total / sum(len(r) for r in rests)


@torch.no_grad()
def greedy(lm: CausalLM, markers: Tensor, question: Sequence[int], n_latents: int, max_new_tokens: int,
           eos_token_id: int | None) -> list[int]:
    """One example's greedy continuation, recomputing the whole sequence for every new token."""
    prefix = prefix_embeddings(lm, markers, question, n_latents)
    new = generate(lm, inputs_embeds=prefix, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                   use_cache=False)[0].tolist()
    return new[: new.index(eos_token_id) + 1] if eos_token_id in new else new
