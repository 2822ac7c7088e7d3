"""Evaluation of LTM exports: the ELBO perplexity bound over a sweep of inference steps, and
conditional generation.

    res = ltm_ppl(["runs/ltm/export", "runs/cp/export"], steps=[0, 4, 16], data="runs/data")

An LTM export gets, for every T in `steps`, T inference steps per held-out sequence (the
training inner loop, `pipeline.ltm.inference.infer`) and then one reparameterised sample at
the fitted posterior:

    ppl_bound(T) = exp(-sum_b ELBO_b / sum_b tokens_b)  >=  exp(-log p(x) / tokens)

an upper bound on the model's true perplexity (in expectation over the sample). A plain
causal-LM export (the `continued_pretraining` / reasoning export layout, `base/`) gets its
exact perplexity on the same windows and the same predicted tokens, so the two are side by
side. Sequences are the first `sequences` `seq_len`-token windows of the validation shards
(seq_len: the LTM's training length unless given), in order; the noise is seeded per window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.data.shards import load_manifest
from pipeline.errors import PipelineError
from pipeline.ltm.export import is_ltm_export, load_ltm
from pipeline.ltm.inference import (
    InferenceConfig,
    Posterior,
    draw_noise,
    elbo_terms,
    infer,
    sequence_seeds,
)
from pipeline.ltm.model import LTMDecoder, next_token_targets
from pipeline.models import from_pretrained
from pipeline.train.data import PackedSequences
from pipeline.train.dual_task import base_dir

EVAL_SEED_STEP = 2**31  # a seed stream of its own: never one a training step used


def _windows(data: str, seq_len: int, sequences: int) -> Tensor:
    manifest = load_manifest(data)
    val = PackedSequences(manifest, "validation", seq_len)
    n = min(sequences, len(val))
    return val.batch(list(range(n)))  # (N, S)


def ltm_elbo(decoder: LTMDecoder, windows: Tensor, cfg: InferenceConfig, steps: int, *, batch_size: int = 8,
             seed: int = 0, progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Summed NLL, KL and tokens over `windows` after `steps` inference steps, and the bound;
    `progress(windows done)` after each batch."""
    device = next(decoder.parameters()).device
    nll = kl = tokens = 0.0
    for first in range(0, len(windows), batch_size):
        x = windows[first: first + batch_size].to(device)
        seeds = [sequence_seeds(seed, EVAL_SEED_STEP, first + b, 0, 1)[0] for b in range(x.shape[0])]
        noise = draw_noise(seeds, steps + 1, decoder.config.latent_shape, device)
        with torch.no_grad():
            post = infer(decoder, x, cfg, noise, steps=steps)
            terms = elbo_terms(decoder, x, post.mu, post.logvar, noise[steps])
        nll, kl, tokens = nll + float(terms.nll.sum()), kl + float(terms.kl.sum()), tokens + float(terms.tokens.sum())
        if progress:
            progress(first + x.shape[0])
    return {"steps": steps, "nll_per_token": nll / tokens, "kl_per_token": kl / tokens,
            "neg_elbo_per_token": (nll + kl) / tokens, "ppl_bound": math.exp((nll + kl) / tokens),
            "recon_ppl": math.exp(nll / tokens), "tokens": int(tokens)}


def plain_ppl(path: str, windows: Tensor, *, batch_size: int = 8, device: str = "cpu") -> dict[str, float]:
    """Exact perplexity of a plain causal LM (a Hugging Face dir or an export's base/) on the windows."""
    lm = from_pretrained(base_dir(path)).to(device).eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            x = windows[first: first + batch_size].to(device)
            targets = next_token_targets(x)
            logits = lm(x).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                           reduction="sum"))
            tokens += float((targets != -100).sum())
    return {"nll_per_token": nll / tokens, "ppl": math.exp(nll / tokens), "tokens": int(tokens),
            "params": lm.num_params()}


def ltm_ppl(models: list[str], *, steps: list[int], data: str | None = None, seq_len: int | None = None,
            sequences: int = 64, batch_size: int = 8, seed: int = 0, device: str = "cpu",
            out: str | Path | None = None, bar: Callable[[int, str], Any] | None = None) -> dict[str, Any]:
    """The sweep for every model; writes OUT/ltm_ppl.json and .md when `out` is given."""
    ltms = [m for m in models if is_ltm_export(m)]
    if not ltms:
        raise PipelineError("ltm-ppl needs at least one LTM export (a directory whose pipeline.json says kind ltm)")
    first_info = json.loads((Path(ltms[0]) / "pipeline.json").read_text())
    data = data or first_info["run_config"]["data"]["path"]
    seq_len = seq_len or first_info["seq_len"]
    if any(t < 0 for t in steps):
        raise PipelineError(f"--steps: inference steps must be >= 0, got {steps}")
    windows = _windows(data, seq_len, sequences)
    results: dict[str, Any] = {"data": str(data), "seq_len": seq_len, "sequences": len(windows), "models": {}}
    for path in models:
        if is_ltm_export(path):
            decoder, info = load_ltm(path, device=device)
            if seq_len > decoder.config.max_position_embeddings:
                raise PipelineError(f"{path}: seq_len {seq_len} exceeds its max_position_embeddings")
            rows = []
            for t in steps:
                shown = bar(len(windows), f"{Path(path).name} T={t}") if bar else None
                rows.append(ltm_elbo(decoder, windows, info["inference"], t, batch_size=batch_size, seed=seed,
                                     progress=shown.update if shown else None))
                if shown:
                    shown.close()
            results["models"][path] = {"kind": "ltm", "params": decoder.num_params(), "sweep": rows}
        else:
            results["models"][path] = {"kind": "causal_lm", **plain_ppl(path, windows, batch_size=batch_size,
                                                                         device=device)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ltm_ppl.json").write_text(json.dumps(results, indent=2))
        (out / "ltm_ppl.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Held-out windows: {results['sequences']} x {results['seq_len']} tokens of {results['data']}", "",
             "| model | params | inference steps T | ppl (bound for LTM) | recon ppl | KL / token |",
             "|---|---|---|---|---|---|"]
    for path, r in results["models"].items():
        if r["kind"] == "ltm":
            for row in r["sweep"]:
                lines.append(f"| {path} | {r['params']:,} | {row['steps']} | <= {row['ppl_bound']:.3f} | "
                             f"{row['recon_ppl']:.3f} | {row['kl_per_token']:.4f} |")
        else:
            lines.append(f"| {path} | {r['params']:,} | - | {r['ppl']:.3f} | - | - |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- generation
@torch.no_grad()
def generate(decoder: LTMDecoder, prompt: Tensor, cfg: InferenceConfig, *, steps: int, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> tuple[Tensor, Posterior]:
    """Infer z from `prompt` `(S,)` with `steps` inference steps (paper 003 §2.3, Eq. 7), then
    decode. temperature 0: greedy tokens with z = mu; else z ~ q(z | prompt) and tokens sampled
    at that temperature. Returns (prompt + new tokens, the posterior)."""
    device = next(decoder.parameters()).device
    x = prompt.to(device).unsqueeze(0)
    noise = draw_noise(sequence_seeds(seed, EVAL_SEED_STEP, 0, 0, 1), steps + 1, decoder.config.latent_shape, device)
    post = infer(decoder, x, cfg, noise, steps=steps)
    z = post.mu if temperature == 0 else post.mu + (0.5 * post.logvar).exp() * noise[steps]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    limit = decoder.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = decoder(x[:, -limit:], z)[:, -1].float()  # (1, V); the window is within the last tokens
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
        x = torch.cat([x, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return x[0], post
