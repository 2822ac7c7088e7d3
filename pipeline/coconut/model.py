"""Coconut (Hao et al. 2024; paper `000` App. B's comparator): one LM that thinks in its own hidden states.

    model = CoconutLM(lm)                                       # lm: any CausalLM (GPT-2, Llama/Qwen)
    nll, n, hits = model(question, q_len, rest, rest_len, n_latents)   # training: summed answer-side NLL
    rows = model.generate_batch(prompts, n_latents=6, max_new_tokens=64, eos_token_id=eos)

An example is read as

    question  <bot>  t_1 .. t_n  <eot>  rest + EOS          (n = k·c at curriculum stage k)

where thought t_1 is the last hidden state (after the final norm) at `<bot>`, and t_j the
last hidden state at t_{j-1}, each fed back as the next input embedding. The loss covers
only `rest + EOS` (predicted from `<eot>` onwards); the question, the markers and the
thoughts are never targets.

`<bot>` and `<eot>` are two learned input-embedding rows (`markers`, `(2, d)`) outside the
vocabulary: they are only ever read, never predicted, so the LM keeps its vocabulary and
its head (the export's `base/` stays a stock Hugging Face checkpoint). Like Coconut's new
tokens they start as a copy of one existing token's embedding (here EOS's).

Batching. Questions of different lengths share a batch right-padded to L, and everything
after them starts at slot L for every row, so the thoughts run in lockstep, one slot per
pass. Row b's positions are its own (question 0..q_b-1, `<bot>` at q_b, thought j at
q_b + j, ...), exactly as if it ran alone; the pad slots between its question and `<bot>`
are hidden from every query by a key-padding mask (`pipeline.attention.causal(key_valid=)`),
and pads after a row's text come after every real token, so causality hides them.

Passes: one over [question ; <bot>], then one per thought t_1 .. t_{n-1} (a single slot
over the KV cache, which keeps its autograd graph: gradients flow through every thought,
as in Coconut), then one over [t_n ; <eot> ; rest] that scores the rest — n + 1 sequential
passes in all (2 at n = 0). `pipeline.coconut.reference` recomputes every thought from
scratch, one example at a time; the tests hold the two equal in losses and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.attention import causal
from pipeline.errors import PipelineError
from pipeline.models import KV, CausalLM
from pipeline.models.generate import continue_batch, right_pad

BOT, EOT = 0, 1
"""Rows of `CoconutLM.markers`."""


def _cat(cache: list[KV], new: list[KV]) -> list[KV]:
    return [(torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2)) for (k, v), (k2, v2) in zip(cache, new, strict=True)]


class CoconutLM(nn.Module):
    """A causal LM plus the `<bot>` / `<eot>` marker embeddings; forward = the training objective."""

    def __init__(self, lm: CausalLM, markers: Tensor | None = None):
        super().__init__()
        self.lm = lm
        if markers is None:
            eos = lm.config.eos_token_id if lm.config.eos_token_id is not None else 0
            with torch.no_grad():
                row = lm.embed(torch.tensor([eos], device=next(lm.parameters()).device))  # (1, d)
            markers = row.expand(2, -1).clone()
        if markers.shape != (2, lm.config.d_model):
            raise PipelineError(f"coconut markers must be (2, {lm.config.d_model}), got {tuple(markers.shape)}")
        self.markers = nn.Parameter(markers.detach().clone().float())

    def _marker(self, which: int, b: int, like: Tensor) -> Tensor:
        return self.markers[which].to(like.dtype).expand(b, 1, -1)  # (B, 1, d)

    # ------------------------------------------------------------------ the thoughts
    def think(self, question: Tensor, q_len: Tensor, n_latents: int) -> tuple[list[KV], Tensor, Tensor | None]:
        """Passes over [question ; <bot>] and thoughts t_1 .. t_{n-1}, for right-padded questions
        `(B, L)` of lengths `q_len` `(B,)`.

        Returns the KV cache of slots [question (L) ; <bot> ; t_1 .. t_{n-1}], which of its slots
        are real `(B, L + n)` (False = the pads after a question), and t_n `(B, 1, d)` (None at n = 0).
        """
        if n_latents < 0:
            raise PipelineError(f"coconut: n_latents must be >= 0, got {n_latents}")
        b, L = question.shape
        dev = question.device
        slots = torch.arange(L, device=dev)
        valid = torch.cat([slots[None] < q_len[:, None], torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
        x = self.lm.embed(question)  # (B, L, d)
        x = torch.cat([x, self._marker(BOT, b, x)], dim=1)  # (B, L + 1, d)
        pos = torch.cat([torch.minimum(slots[None], q_len[:, None] - 1).expand(b, L), q_len[:, None]], 1)
        out = self.lm(inputs_embeds=x, position_ids=pos, attention=causal(L + 1, L + 1, key_valid=valid),
                      return_kv=True, return_logits=False)
        cache, thought = out.kv, out.hidden_states[:, -1:]  # t_1: the last hidden state at <bot>
        if n_latents == 0:
            return cache, valid, None
        for j in range(1, n_latents):  # thought j in, thought j + 1 out
            valid = torch.cat([valid, valid.new_ones(b, 1)], dim=1)
            # one query per row: SDPA with a small dense mask (a FlexAttention BlockMask would be
            # rebuilt, and its kernel recompiled, for every new key length; as in decoding)
            mask = causal(1, valid.shape[1], key_valid=valid, backend="sdpa")
            out = self.lm(inputs_embeds=thought, position_ids=(q_len + j)[:, None], prefix_kv=cache,
                          attention=mask, return_kv=True, return_logits=False)
            cache, thought = _cat(cache, out.kv), out.hidden_states
        return cache, valid, thought

    def _tail(self, thought: Tensor | None, b: int, like: Tensor) -> Tensor:
        """The inputs after the cache: [t_n ; <eot>] (or <eot> alone at n = 0), `(B, m + 1, d)`."""
        eot = self._marker(EOT, b, like)
        return eot if thought is None else torch.cat([thought, eot], dim=1)

    # ------------------------------------------------------------------ training / scoring
    def answer_nll(self, question: Tensor, q_len: Tensor, rest: Tensor, rest_len: Tensor, n_latents: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token NLL `(B, R)` of the right-padded `rest` `(B, R)` (lengths `rest_len`) after
        question, <bot>, n thoughts, <eot>; whether each was the argmax `(B, R)`; and the mask of
        real tokens `(B, R)` (NLL and argmax are 0 / False at pads)."""
        b, R = rest.shape
        dev = rest.device
        cache, valid, thought = self.think(question, q_len, n_latents)
        emb = self.lm.embed(rest)  # (B, R, d)
        tail = self._tail(thought, b, emb)
        x = torch.cat([tail, emb[:, :-1]], dim=1)  # the last rest token predicts nothing
        m = tail.shape[1] - 1  # index of <eot> in x
        first = q_len + n_latents + (0 if thought is not None else 1)  # position of x[:, 0]
        last_real = q_len + n_latents + rest_len  # position of the last fed real token (the one before EOS)
        pos = torch.minimum(first[:, None] + torch.arange(x.shape[1], device=dev), last_real[:, None])
        keys = torch.cat([valid, valid.new_ones(b, x.shape[1])], dim=1)
        out = self.lm(inputs_embeds=x, position_ids=pos, prefix_kv=cache,
                      attention=causal(x.shape[1], keys.shape[1], key_valid=keys), return_logits=False)
        h = out.hidden_states[:, m:]  # (B, R, d): <eot>, rest[0 .. R-2]
        mask = torch.arange(R, device=dev)[None] < rest_len[:, None]  # (B, R)
        logits = self.lm.lm_head(h[mask]).float()  # (N, V): the head only where a target is
        gold = rest[mask]
        nll, hits = torch.zeros(b, R, device=dev, dtype=logits.dtype), torch.zeros(b, R, dtype=torch.bool, device=dev)
        nll = nll.masked_scatter(mask, F.cross_entropy(logits, gold, reduction="none"))
        hits = hits.masked_scatter(mask, logits.argmax(-1) == gold)
        return nll, hits, mask

    def forward(self, question: Tensor, q_len: Tensor, rest: Tensor, rest_len: Tensor, n_latents: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Summed NLL of the batch's answer-side tokens, their count, and argmax hits."""
        nll, hits, mask = self.answer_nll(question, q_len, rest, rest_len, n_latents)
        return nll.sum(), mask.sum(), hits.sum()

    @torch.no_grad()
    def score_answers(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
                      n_latents: int) -> list[list[float]]:
        """Teacher-forced NLL of each target (ids, e.g. answer side + EOS) after its context (the
        question's ids), <bot>, n thoughts and <eot>: one list of per-token NLLs per example."""
        if any(len(t) == 0 for t in targets):
            raise PipelineError("coconut: every target needs at least one token")
        device = next(self.parameters()).device
        question, q_len = right_pad(contexts, device)
        rest, rest_len = right_pad(targets, device)
        nll, _, _ = self.answer_nll(question, q_len, rest, rest_len, n_latents)
        return [row[: len(t)].tolist() for row, t in zip(nll.float().cpu(), targets, strict=True)]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], *, n_latents: int,
                       max_new_tokens: int | Sequence[int], **options) -> list[list[int]]:
        """New tokens of each prompt (lists of ids, any lengths) after <bot>, n thoughts, <eot>.

        `options`: as `pipeline.models.generate.continue_batch` (`eos_token_id`, `stop`,
        `stop_strings` + `decode`, sampling). Greedy rows equal those of each prompt alone.
        """
        question, q_len = right_pad(prompts, next(self.parameters()).device)
        cache, valid, thought = self.think(question, q_len, n_latents)
        tail = self._tail(thought, question.shape[0], cache[0][0])
        first = q_len + n_latents + (0 if thought is not None else 1)
        pos = first[:, None] + torch.arange(tail.shape[1], device=question.device)
        return continue_batch(self.lm, tail, pos, prefix_kv=cache, prefix_valid=None if bool(valid.all()) else valid,
                              max_new_tokens=max_new_tokens, **options)

    def max_prompt(self, n_latents: int, max_new_tokens: int) -> int:
        """Longest prompt whose <bot>, thoughts, <eot> and new tokens fit the model's positions."""
        return self.lm.config.max_position_embeddings - n_latents - 2 - max_new_tokens + 1
