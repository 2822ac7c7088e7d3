"""Greedy / sampled decoding with a KV cache, for one prompt length or many in one batch.

The cache is just the per-layer K/V the model returns, fed back as `prefix_kv`:
prefill the prompt once, then each step runs one token per row over [cache ; token].
An initial `prefix_kv` (e.g. K/V injected by another model) sits in front of the
prompt; prompt positions continue after it unless `position_offset` says otherwise.

Prompts of different lengths share a batch by right-padding them: row b's tokens sit
at cache slots and position ids 0..len_b-1 exactly as when run alone, and the pads
after them cannot reach them under the causal mask. From then on a `key_valid` mask
(`pipeline.attention.causal`) hides the pad slots from every query, and each row
continues from its own position. A row that stops (EOS, a stop sequence or string,
its own token budget) leaves the batch, so its list ends there.

    rows = generate_batch(model, [[5, 6], [7, 8, 9, 10]], max_new_tokens=[20, 8], eos_token_id=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pipeline.attention import causal
from pipeline.errors import PipelineError
from pipeline.models.base import CausalLM
from pipeline.models.layers import KV


def _pick(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> Tensor:
    """Next token `(B,)` from last-position logits `(B, V)`."""
    if temperature <= 0:
        return logits.max(dim=-1).indices  # = argmax (first maximum), 3x faster on CPU at batch 16
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


@dataclasses.dataclass(frozen=True)
class StopCriteria:
    """When a row is finished, besides its token budget. The token that stops a row is
    kept: a row's list ends with the EOS, the last token of a stop sequence, or the token
    that completed a stop string (callers cut the text at the string themselves)."""

    eos_token_id: int | None = None
    sequences: tuple[tuple[int, ...], ...] = ()
    """Stop when the new tokens end with one of these token-id sequences."""
    strings: tuple[str, ...] = ()
    """Stop when `decode(new tokens)` contains one of these strings."""
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if any(len(s) == 0 for s in self.sequences) or any(s == "" for s in self.strings):
            raise PipelineError("generate: empty stop sequence or stop string")
        if self.strings and self.decode is None:
            raise PipelineError("generate: stop strings need a `decode` callable (token ids -> text)")

    def done(self, new: list[int]) -> bool:
        """Whether a row whose new tokens are `new` (just grown by one) is finished."""
        if self.eos_token_id is not None and new[-1] == self.eos_token_id:
            return True
        if any(len(new) >= len(s) and tuple(new[-len(s):]) == s for s in self.sequences):
            return True
        if self.strings:
            text = self.decode(new)
            return any(s in text for s in self.strings)
        return False


@torch.no_grad()
def continue_batch(
    model: CausalLM,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    *,
    max_new_tokens: int | Sequence[int],
    prefix_kv: list[KV] | None = None,
    prefix_valid: Tensor | None = None,
    lengths: Tensor | None = None,
    eos_token_id: int | None = None,
    stop: Sequence[Sequence[int]] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens of each row after running `inputs_embeds` `(B, n, d)` at `position_ids` `(B, n)`.

    prefix_kv: per-layer K/V `(B, nkv, P, hs)` in front of the inputs (a prompt's cache,
        another model's K/V); `prefix_valid` `(B, P)` bool marks its real slots (None = all).
    lengths: `(B,)` real inputs per row when the inputs are right-padded (None = all n);
        row b continues after input `lengths[b] - 1`, at position `position_ids[b, lengths[b]-1] + 1`.
    max_new_tokens: one budget for every row, or one per row (0 allowed).
    Stops: `eos_token_id`; `stop`, token-id sequences; `stop_strings`, checked on
    `decode(new tokens)`. Sampling: temperature 0 = greedy, else sample from the top_k
    tokens / top_p mass with `generator`. Finished rows leave the batch.
    """
    b, n = inputs_embeds.shape[:2]
    budget = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budget) != b or min(budget, default=0) < 0:
        raise PipelineError(f"generate: max_new_tokens must be >= 0, one per row ({b} rows), got {max_new_tokens}")
    stopping = StopCriteria(eos_token_id, tuple(tuple(int(t) for t in s) for s in stop or ()),
                            tuple(stop_strings or ()), decode)
    device = inputs_embeds.device
    last = torch.full((b,), n - 1, device=device) if lengths is None else lengths.to(device) - 1  # (B,)
    next_pos = position_ids.gather(1, last[:, None])[:, 0] + 1  # (B,)
    _check_positions(model, next_pos, budget)

    # prefill: the inputs over the prefix; pads in the prefix are masked, right-pads of the
    # inputs come after every real input and so never reach one
    p = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
    attention = None
    if prefix_valid is not None:
        attention = causal(n, p + n, key_valid=torch.cat([prefix_valid, prefix_valid.new_ones(b, n)], 1))
    res = model(inputs_embeds=inputs_embeds, position_ids=position_ids, prefix_kv=prefix_kv,
                attention=attention, return_kv=True, return_logits=False)
    hidden = res.hidden_states.gather(1, last.view(b, 1, 1).expand(-1, 1, res.hidden_states.shape[-1]))
    logits = model.lm_head(hidden[:, 0])  # (B, V): only the rows' last real inputs get the head
    cache = _cat_kv(prefix_kv, res.kv)
    valid = None
    if prefix_valid is not None or lengths is not None:
        own = torch.arange(n, device=device)[None] <= last[:, None]  # (B, n)
        pre = prefix_valid if prefix_valid is not None else own.new_ones(b, p)
        valid = torch.cat([pre.bool(), own], dim=1)  # (B, P + n)
        valid = None if bool(valid.all()) else valid
    return _decode(model, logits, cache, valid, next_pos, budget, stopping,
                   lambda lg: _pick(lg, temperature, top_k, top_p, generator))


def _decode(model: CausalLM, logits: Tensor, cache: list[KV], valid: Tensor | None, pos: Tensor,
            budget: list[int], stopping: StopCriteria, pick: Callable[[Tensor], Tensor]) -> list[list[int]]:
    """The decoding loop: pick, record, drop finished rows, feed the rest one token each.

    The cache lives in per-layer buffers sized for the longest budget: each step reads a view
    of the filled part and writes its own K/V in place, instead of copying the whole cache
    into a new tensor every step.
    """
    out: list[list[int]] = [[] for _ in budget]
    rows = [r for r, m in enumerate(budget) if m > 0]  # original row of each batch row
    keep = torch.tensor(rows, dtype=torch.long, device=pos.device)
    if len(rows) < len(budget):
        logits, cache, valid, pos = _select(keep, logits, cache, valid, pos)
    filled = cache[0][0].shape[2]
    buffers = [(_grow(k, filled + max(budget, default=0)), _grow(v, filled + max(budget, default=0)))
               for k, v in cache]
    while rows:
        token = pick(logits)  # (b,)
        alive = []
        for i, t in enumerate(token.tolist()):
            new = out[rows[i]]
            new.append(t)
            if len(new) < budget[rows[i]] and not stopping.done(new):
                alive.append(i)
        if not alive:
            break
        if len(alive) < len(rows):  # finished rows leave the batch
            keep = torch.tensor(alive, dtype=torch.long, device=pos.device)
            token = token[keep]
            _, buffers, valid, pos = _select(keep, None, buffers, valid, pos)
            rows = [rows[i] for i in alive]
            if valid is not None and bool(valid.all()):
                valid = None  # only unpadded rows left: no mask needed
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(len(rows), 1)], dim=1)
        # one query per row: SDPA with a small dense mask (a FlexAttention BlockMask gains
        # nothing here and would be rebuilt, and recompiled, for every new key length)
        attention = causal(1, filled + 1, key_valid=valid, backend="sdpa")
        prefix = [(k[:, :, :filled], v[:, :, :filled]) for k, v in buffers]
        res = model(inputs_embeds=model.embed(token[:, None]), position_ids=pos[:, None], prefix_kv=prefix,
                    attention=attention, return_kv=True, return_logits=False)
        logits = model.lm_head(res.hidden_states[:, -1])
        for (k_buf, v_buf), (k, v) in zip(buffers, res.kv, strict=True):
            k_buf[:, :, filled] = k[:, :, 0]
            v_buf[:, :, filled] = v[:, :, 0]
        filled += 1
        pos = pos + 1
    return out


def _grow(t: Tensor, length: int) -> Tensor:
    """`t` `(B, h, L, hs)` copied into the front of a `(B, h, length, hs)` buffer."""
    buf = t.new_empty(t.shape[0], t.shape[1], length, t.shape[3])
    buf[:, :, : t.shape[2]] = t
    return buf


def _select(keep: Tensor, logits: Tensor | None, cache: list[KV], valid: Tensor | None, pos: Tensor):
    """The batch rows `keep` of the decoding state."""
    return (
        logits[keep] if logits is not None else None,
        [(k[keep], v[keep]) for k, v in cache],
        valid[keep] if valid is not None else None,
        pos[keep],
    )


def _check_positions(model: CausalLM, next_pos: Tensor, budget: list[int]) -> None:
    """Every fed position must exist: the i-th new token (i < budget) is fed at next_pos + i - 1."""
    last_fed = next_pos - 1 + torch.tensor([max(m - 1, 0) for m in budget], device=next_pos.device)
    limit = model.config.max_position_embeddings
    if len(budget) and int(last_fed.max()) >= limit:
        r = int(last_fed.argmax())
        raise PipelineError(
            f"generate: row {r} would reach position {int(last_fed[r])} (prompt up to {int(next_pos[r]) - 1}, "
            f"{budget[r]} new tokens), beyond the model's {limit} positions; shorten the prompt or "
            "max_new_tokens (EvalModel.last_site gives the longest prompt that fits)"
        )


def right_pad(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token ids `(B, T)` right-padded with 0 (pads are never attended to) and lengths `(B,)`."""
    if not prompts:
        raise PipelineError("generate: no prompts")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise PipelineError(f"generate: prompt {lengths.index(0)} is empty; every prompt needs a token")
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return ids.to(device), torch.tensor(lengths, device=device)


@torch.no_grad()
def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | None = None,
    stop: Sequence[Sequence[int]] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens of each prompt (lists of ids, any lengths), decoded as one batch.

    Each row's tokens equal what `generate` gives that prompt alone (greedy), up to the
    row's stop: `eos_token_id`, a `stop` token sequence, a `stop_strings` string in
    `decode(new tokens)`, or its `max_new_tokens` (one int, or one per prompt). The
    stopping token is kept as the row's last.
    """
    device = next(model.parameters()).device
    ids, lengths = right_pad(prompts, device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    return continue_batch(
        model, model.embed(ids), positions, lengths=lengths, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, stop=stop, stop_strings=stop_strings, decode=decode,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
    )


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
    row, no padding; `generate_batch` takes prompts of different lengths). temperature
    0 = greedy; otherwise sample, optionally restricted to the top_k tokens / the top_p
    probability mass. Rows that emit `eos_token_id` are padded with it; decoding stops
    early when every row has. `use_cache=False` recomputes the whole sequence each step
    (the reference the cache is tested against).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise PipelineError("generate: give exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise PipelineError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = model.embed(input_ids) if input_ids is not None else inputs_embeds  # (B, T, d)
    b, t = prompt.shape[:2]
    p = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
    start = p if position_offset is None else position_offset
    positions = torch.arange(start, start + t, device=prompt.device).expand(b, t)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    fill = eos_token_id if eos_token_id is not None else 0
    if not use_cache:
        _check_positions(model, positions[:, -1] + 1, [max_new_tokens] * b)
        return _recompute(model, prompt, positions, prefix_kv, max_new_tokens, eos_token_id, fill, sampling)
    rows = continue_batch(model, prompt, positions, prefix_kv=prefix_kv, max_new_tokens=max_new_tokens,
                          eos_token_id=eos_token_id, **sampling)
    out = torch.full((b, max_new_tokens), fill, dtype=torch.long, device=prompt.device)
    for r, new in enumerate(rows):
        out[r, : len(new)] = torch.tensor(new, dtype=torch.long)
    return out


def _recompute(model: CausalLM, prompt: Tensor, positions: Tensor, prefix_kv: list[KV] | None,
               max_new_tokens: int, eos_token_id: int | None, fill: int, sampling: dict) -> Tensor:
    """`generate` without a cache: the whole sequence again each step (the reference).
    Only unfinished rows are sampled, in row order, as the cached path does."""
    b, t = prompt.shape[:2]
    start = int(positions[0, 0])
    out = torch.full((b, max_new_tokens), fill, dtype=torch.long, device=prompt.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    seq = prompt  # (B, T + i, d)
    for i in range(max_new_tokens):
        logits = model(inputs_embeds=seq, position_ids=torch.arange(start, start + t + i, device=seq.device),
                       prefix_kv=prefix_kv).logits[:, -1]
        token = torch.full_like(done, fill, dtype=torch.long)
        token[~done] = _pick(logits[~done], **sampling)
        if eos_token_id is not None:
            done |= token == eos_token_id
        out[:, i] = token
        if bool(done.all()):
            break
        seq = torch.cat([seq, model.embed(token[:, None])], dim=1)
    return out
