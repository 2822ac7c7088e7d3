"""Latent reasoning speed: dual Hyp. 2 (three passes) vs Coconut (N_L + 1 sequential passes).

    python launchers/benchmark.py latent                     # CPU, gpt2-tiny body, N_L in {4, 8, 16}
    python launchers/benchmark.py latent --preset gpt2-124m --device cuda

Both systems get the same model, the same batch of ProsQA-mini examples (GPT-2 tokens) and
the same number of latents; a training step is forward + backward of the fine-tuning loss
at the last curriculum stage (all steps latent), inference is the latents for a batch of
questions plus `--new-tokens` greedy tokens, reported per example. Paper `000` estimates
Coconut's cost relative to the dual model as (N_L + 1) / 3 (≈ 5.7x at N_L = 16): the table
prints that next to the measured ratio. Medians over `--repeats` after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.data.tokenizer import load_tokenizer
from pipeline.dual import DualConfig, DualModel
from pipeline.dual.inference import augment_and_generate_batch
from pipeline.models import build_model, preset
from pipeline.paths import shared_data_dir
from pipeline.tasks import prosqa
from pipeline.tasks.curriculum import Curriculum, CurriculumConfig
from pipeline.tasks.latent import LatentSFTModel, StageExamples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def setup(preset_name: str, n_examples: int, device: torch.device, dtype: torch.dtype):
    """(tokenizer, examples, a fresh base LM) shared by both systems."""
    tok = load_tokenizer(shared_data_dir() / "tokenizers" / "gpt2")
    examples = prosqa.generate_prosqa(n_examples, seed=0, preset="mini")
    torch.manual_seed(0)
    lm = build_model(preset(preset_name, vocab_size=50257, eos_token_id=tok.eos_id,
                            max_position_embeddings=1024)).to(device, dtype)
    return tok, examples, lm


def dual_timings(lm, tok, examples, n_latents: int, *, repeats: int, new_tokens: int,
                 device: torch.device) -> dict[str, float]:
    """Seconds per training step (batch) and per example of inference, dual h2 at `n_latents`."""
    cur = Curriculum(CurriculumConfig(schedule="none", n_latents=n_latents))
    dual = DualModel(lm, DualConfig(variant="h2", n_latents=n_latents, n_ahead=1, n_sites=1), eos_id=tok.eos_id)
    dual.to(device)
    rows = StageExamples(examples, tok, cur, 1)
    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rows.batch(list(range(len(examples)))).items()}
    model = LatentSFTModel(dual)

    def step():
        nll, n, _ = model(b["input_ids"], b["sites"], b["ahead_mask"], b["n_latents"])
        (nll / n).backward()
        dual.zero_grad(set_to_none=True)

    prompts = rows.prompts

    @torch.no_grad()
    def infer():
        augment_and_generate_batch(dual, prompts, max_new_tokens=new_tokens)

    return {"train_step_s": timed(step, repeats, device),
            "infer_per_example_s": timed(infer, repeats, device) / len(examples)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-tiny", help="model preset for both systems (GPT-2 vocabulary)")
    ap.add_argument("--latents", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batch", type=int, default=8, help="examples per training step / inference batch")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated after the latents")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok, examples, lm = setup(args.preset, args.batch, device, dtype)
    try:
        from pipeline.tasks.coconut import coconut_timings
    except ImportError:
        coconut_timings = None
    print(f"{args.preset}, batch {args.batch}, {args.new_tokens} new tokens, {device.type}, "
          f"median of {args.repeats}\n")
    print("| N_L | dual h2 step (s) | Coconut step (s) | ratio | inference/example dual (ms) | Coconut (ms) "
          "| ratio | paper 000 estimate (N_L+1)/3 |")
    print("|---|---|---|---|---|---|---|---|")
    for n_l in args.latents:
        d = dual_timings(lm, tok, examples, n_l, repeats=args.repeats, new_tokens=args.new_tokens, device=device)
        c = (coconut_timings(lm, tok, examples, n_l, repeats=args.repeats, new_tokens=args.new_tokens,
                             device=device) if coconut_timings else None)
        if c:
            print(f"| {n_l} | {d['train_step_s']:.3f} | {c['train_step_s']:.3f} | "
                  f"{c['train_step_s'] / d['train_step_s']:.2f}x | {1e3 * d['infer_per_example_s']:.1f} | "
                  f"{1e3 * c['infer_per_example_s']:.1f} | {c['infer_per_example_s'] / d['infer_per_example_s']:.2f}x "
                  f"| {(n_l + 1) / 3:.2f}x |")
        else:
            print(f"| {n_l} | {d['train_step_s']:.3f} | - | - | {1e3 * d['infer_per_example_s']:.1f} | - | - "
                  f"| {(n_l + 1) / 3:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
