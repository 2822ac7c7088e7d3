"""Evaluation speed: ppl-at-k sites/s, multiple-choice and generation questions/s (printed, never asserted).

    python -m pipeline.eval.benchmark                     # CPU: gpt2-tiny (vocab 50257)
    python -m pipeline.eval.benchmark --preset gpt2-124m  # GPU: the GPT-2 124M shape

Random weights and random tokens: speed does not depend on the values. A `liu` dual
model with N_L latents; ppl-at-k scores K tokens after each site with augmentation and
with the Base alone; multiple choice scores 4 continuations per question; generation
decodes greedily after prompts of varied length, one question at a time and in batches
(`EvalModel.generate_batch`, as GSM8K does).

    python -m pipeline.eval.benchmark --reasoning [--reasoning-model DIR] --gen-new-tokens 64

`--reasoning` times only `evaluate.py reasoning`'s loop (`reasoning.evaluate_reasoning`) on
the first `--reasoning-questions` official ProsQA test questions (GPT-2 tokenizer), one at a
time and `--gen-batch-size` at a time: a random gpt2-tiny with 768 positions (every row decodes
its whole budget) or a trained model directory (rows stop at EOS).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.dual import DualConfig, DualModel
from pipeline.eval import ppl as pk
from pipeline.eval.models import EvalModel, load_eval_model, resolve_tokenizer
from pipeline.eval.multiple_choice import score_requests
from pipeline.eval.reasoning import evaluate_reasoning
from pipeline.models import build_model, preset
from pipeline.paths import shared_data_dir
from pipeline.tasks.prosqa import load_prosqa


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default: gpt2-124m on GPU, gpt2-tiny on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU")
    p.add_argument("--n-latents", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--sites-per-doc", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sites-per-row", type=int, default=16)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--mc-batch-size", type=int, default=16)
    p.add_argument("--gen-new-tokens", type=int, default=32)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--reasoning", action="store_true", help="only the ProsQA reasoning-evaluation benchmark")
    p.add_argument("--reasoning-model", help="model directory for --reasoning (default: random gpt2-tiny)")
    p.add_argument("--reasoning-questions", type=int, default=256)
    args = p.parse_args(argv)
    if args.reasoning:
        return _reasoning(args)
    gpu = args.device.startswith("cuda")
    name = args.preset or ("gpt2-124m" if gpu else "gpt2-tiny")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or ("bfloat16" if gpu else "float32")]
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=50257) if name.endswith("tiny") else preset(name)
    base = build_model(cfg)
    dual = DualModel(base, DualConfig(variant="liu", n_latents=args.n_latents, n_ahead=16, n_sites=1),
                     eos_id=cfg.eos_token_id)
    model = EvalModel(name, None, dual.to(args.device, dtype).eval(), {"variant": "liu"})  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    seq = cfg.max_position_embeddings
    docs = [rng.integers(0, cfg.vocab_size - 1, seq) for _ in range(args.docs)]
    pcfg = pk.PplConfig(k=args.k, sites_per_doc=args.sites_per_doc, batch_size=args.batch_size,
                        sites_per_row=args.sites_per_row)
    plan = pk.plan_sites(docs, pcfg, model.last_site(args.k))
    print(f"{name} on {args.device} ({str(dtype).split('.')[-1]}), liu N_L={args.n_latents}, K={args.k}, "
          f"{len(plan)} sites in {args.docs} documents of {seq} tokens")
    small = pk.SitePlan(plan.doc[: args.sites_per_row], plan.site[: args.sites_per_row])
    for augment in (True, False):
        pk.score_plan(model, docs, small, pcfg, augment=augment)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        pk.score_plan(model, docs, plan, pcfg, augment=augment)
        _sync(args.device)
        dt = time.perf_counter() - t0
        print(f"  ppl-at-k {'augmented ' if augment else 'base alone'}: {len(plan) / dt:8.1f} sites/s  ({dt:.2f} s)")
    # multiple choice: contexts of ~1/3 of the positions, 4 continuations of 5-20 tokens
    reqs = []
    for _ in range(args.questions):
        ctx = rng.integers(0, cfg.vocab_size - 1, int(rng.integers(seq // 6, seq // 3))).tolist()
        reqs += [(ctx, rng.integers(0, cfg.vocab_size - 1, int(rng.integers(5, 21))).tolist()) for _ in range(4)]
    score_requests(model, reqs[: args.mc_batch_size], batch_size=args.mc_batch_size)  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    score_requests(model, reqs, batch_size=args.mc_batch_size)
    _sync(args.device)
    dt = time.perf_counter() - t0
    print(f"  multiple choice (4 choices, augmented): {args.questions / dt:8.1f} questions/s  ({dt:.2f} s)")
    # generation: --questions prompts of 8 .. the longest that fits, --gen-new-tokens each (no EOS)
    n_new = args.gen_new_tokens
    longest = model.last_site(n_new) + 1
    prompts = [rng.integers(0, cfg.vocab_size - 1, int(rng.integers(8, longest + 1))).tolist()
               for _ in range(args.questions)]
    for batch in (1, args.gen_batch_size):
        dt = _generate_all(model, prompts, n_new, batch, args.device)
        print(f"  generation ({n_new} new tokens, augmented, batch {batch:2d}): "
              f"{len(prompts) / dt:8.1f} questions/s  ({dt:.2f} s)")
    return 0


def _generate_all(model: EvalModel, prompts: list[list[int]], n_new: int, batch: int, device: str) -> float:
    """Seconds to decode every prompt, `batch` at a time, longest first (as GSM8K batches)."""
    order = sorted(prompts, key=len, reverse=True)
    model.generate_batch(order[:batch], max_new_tokens=n_new, eos_token_id=None)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for a in range(0, len(order), batch):
        model.generate_batch(order[a: a + batch], max_new_tokens=n_new, eos_token_id=None)
    _sync(device)
    return time.perf_counter() - t0


def reasoning_speed(model: EvalModel, tok: Tokenizer, n: int = 256, batch_sizes: tuple[int, ...] = (1, 16),
                    max_new_tokens: int = 64, device: str = "cpu") -> dict[int, tuple[float, float]]:
    """batch size -> (questions/s, accuracy) of `evaluate_reasoning` on the first `n` ProsQA test questions."""
    examples = load_prosqa("test")[:n]
    top = max(batch_sizes)
    evaluate_reasoning(model, tok, "prosqa", examples[:top], batch_size=top, max_new_tokens=max_new_tokens)  # warm-up
    out = {}
    for b in batch_sizes:
        _sync(device)
        t0 = time.perf_counter()
        r = evaluate_reasoning(model, tok, "prosqa", examples, batch_size=b, max_new_tokens=max_new_tokens)
        _sync(device)
        out[b] = (len(examples) / (time.perf_counter() - t0), r["accuracy"])
    return out


def _reasoning(args: argparse.Namespace) -> int:
    tok = load_tokenizer(shared_data_dir() / "tokenizers" / "gpt2")
    if args.reasoning_model:
        model = load_eval_model(args.reasoning_model, device=args.device)
        tok = resolve_tokenizer([model])
    else:
        torch.manual_seed(0)
        # init_std 0.1, not 0.02: at 0.02 the tied head echoes the prompt's last token, "\n", and the
        # blank-line stop ends every row after 2 tokens; at 0.1 every row decodes its whole budget.
        base = build_model(preset("gpt2-tiny", vocab_size=50257, eos_token_id=tok.eos_id, max_position_embeddings=768,
                                  init_std=0.1))
        dual = DualModel(base, DualConfig(variant="continued_pretraining", n_sites=1), eos_id=tok.eos_id)
        model = EvalModel("gpt2-tiny (random)", None, dual.to(args.device).eval(), None)  # type: ignore[arg-type]
    speeds = reasoning_speed(model, tok, args.reasoning_questions, (1, args.gen_batch_size), args.gen_new_tokens,
                             args.device)
    print(f"evaluate.py reasoning, {model.name} on {args.device}: {args.reasoning_questions} ProsQA test questions, "
          f"up to {args.gen_new_tokens} new tokens")
    for b, (qps, acc) in speeds.items():
        print(f"  batch {b:2d}: {qps:8.2f} questions/s  (accuracy {100 * acc:.1f}%)")
    first, last = speeds[1][0], speeds[args.gen_batch_size][0]
    print(f"  speed-up: {last / first:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
