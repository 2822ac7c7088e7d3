"""Speed of Coconut against the dual Hyp. 2: one training step and inference per example at N_L ∈ {4, 8, 16}.

    python launchers/benchmark.py coconut                       # CPU, 4-layer d=128 GPT-2, batch 8
    python launchers/benchmark.py coconut --n-latents 4 8 16 --question 128 --answer 16 --batch 8

Coconut runs N_L + 1 sequential passes per example (one over question + <bot>, one per
thought t_1 .. t_{N_L-1}, one over t_{N_L}, <eot> and the answer), where a dual model runs
three whatever N_L (paper `000` estimates the ratio (N_L + 1) / 3, ≈ 5.7x at N_L = 16).

- "train step": loss, backward and AdamW on a batch (`CoconutLM.forward`, the task's path);
- "infer / example": `CoconutLM.generate_batch` of `--answer` greedy tokens for the batch
  (thoughts, then KV-cached decoding, no early stop), divided by the batch size;
- "plain step": a causal-LM step of the same model on question + answer (no thoughts), for scale,
  timed round-robin with the other two (a noisy neighbour slows all three alike).

The dual Hyp. 2 (`dual_steps`: the `latent_sft` loss, one site per example at the question's
end, N_L latents, the answer as its ahead tokens; inference = `augment_and_generate_batch`)
runs round-robin with them on the same model and shapes, and the table prints Coconut / Hyp. 2
next to the paper's estimate. Nothing is asserted: this prints figures.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.coconut.model import CoconutLM
from pipeline.models import ModelConfig, build_model, preset
from pipeline.models.benchmark import time_interleaved


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 8
    question: int = 128
    """Question tokens per example."""
    answer: int = 16
    """Answer-side tokens per example (scored in training, generated at inference)."""


def bench_config(name: str = "gpt2-tiny", **overrides) -> ModelConfig:
    """The benchmark's default model: the 4-layer d = 128 GPT-2 of issue 15's calibration runs."""
    base = {"n_layer": 4, "d_model": 128, "n_head": 4, "vocab_size": 50257, "eos_token_id": 50256,
            "max_position_embeddings": 512}
    return preset(name, **(base | overrides))


def coconut_steps(config: ModelConfig, n_latents: int, shape: Shape, *, seed: int = 0
                  ) -> dict[str, Callable[[], None]]:
    """{"train": one training step, "infer": inference of one batch} of a fresh Coconut model."""
    torch.manual_seed(seed)
    model = CoconutLM(build_model(config))
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(0, config.vocab_size, (shape.batch, shape.question), generator=g)
    rest = torch.randint(0, config.vocab_size, (shape.batch, shape.answer), generator=g)
    q_len = torch.full((shape.batch,), shape.question)
    rest_len = torch.full((shape.batch,), shape.answer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    prompts = question.tolist()

    def train() -> None:
        nll, n, _ = model(question, q_len, rest, rest_len, n_latents)
        (nll / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        model.generate_batch(prompts, n_latents=n_latents, max_new_tokens=shape.answer, eos_token_id=None)

    return {"train": train, "infer": infer}


def dual_steps(config: ModelConfig, n_latents: int, shape: Shape, *, seed: int = 0
               ) -> dict[str, Callable[[], None]]:
    """{"dual_train", "dual_infer"}: the same as `coconut_steps` for a dual Hyp. 2 model (three passes)."""
    from pipeline.dual import DualConfig, DualModel
    from pipeline.dual.inference import augment_and_generate_batch
    from pipeline.tasks.latent import LatentSFTModel

    torch.manual_seed(seed)
    dual = DualModel(build_model(config), DualConfig(variant="h2", n_latents=n_latents, n_ahead=1, n_sites=1),
                     eos_id=config.eos_token_id)
    model = LatentSFTModel(dual)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (shape.batch, shape.question + shape.answer + 1), generator=g)
    sites = torch.full((shape.batch, 1), shape.question - 1)
    mask = torch.ones(shape.batch, shape.answer, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in dual.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    prompts = ids[:, : shape.question].tolist()

    def train() -> None:
        nll, n, _ = model(ids, sites, mask, n_latents)
        (nll / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        augment_and_generate_batch(dual, prompts, max_new_tokens=shape.answer)

    return {"dual_train": train, "dual_infer": infer}


def plain_step(config: ModelConfig, shape: Shape, *, seed: int = 0) -> Callable[[], None]:
    """A causal-LM training step of the same model on question + answer (no thoughts)."""
    torch.manual_seed(seed)
    lm = build_model(config)
    x = torch.randint(0, config.vocab_size, (shape.batch, shape.question + shape.answer))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        h = lm(x[:, :-1], return_logits=False).hidden_states[:, shape.question - 1:]  # the answer side only
        F.cross_entropy(lm.lm_head(h).flatten(0, 1), x[:, shape.question:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_coconut(config: ModelConfig, n_latents: int, shape: Shape, *, rounds: int = 5, warmup: int = 1
                 ) -> dict[str, float]:
    """Median seconds of a training step and of inference per example (plus the pass count), timed
    round-robin with a plain causal-LM step of the same model (`plain_step_s`)."""
    steps = (coconut_steps(config, n_latents, shape) | dual_steps(config, n_latents, shape)
             | {"plain": plain_step(config, shape)})
    t = time_interleaved(steps, rounds, warmup, torch.device("cpu"))
    return {"n_latents": n_latents, "passes": n_latents + 1, "train_step_s": t["train"],
            "infer_per_example_s": t["infer"] / shape.batch, "plain_step_s": t["plain"],
            "dual_train_step_s": t["dual_train"], "dual_infer_per_example_s": t["dual_infer"] / shape.batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py coconut", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-tiny", help="model family preset (resized to --layers/--d-model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary (the head and embedding's share of a step)")
    ap.add_argument("--n-latents", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--question", type=int, default=128)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args.preset, n_layer=args.layers, d_model=args.d_model, vocab_size=args.vocab,
                          eos_token_id=min(50256, args.vocab - 1))
    shape = Shape(args.batch, args.question, args.answer)
    print(f"cpu, threads {torch.get_num_threads()}, {args.preset} {args.layers} layers d={args.d_model} "
          f"vocab {config.vocab_size}; batch {shape.batch}, question {shape.question}, answer {shape.answer} tokens")
    print("| N_L | Coconut step (ms) | Hyp. 2 step (ms) | ratio | Coconut infer/ex (ms) | Hyp. 2 infer/ex (ms) "
          "| ratio | paper 000 (N_L+1)/3 | plain LM step (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.n_latents:
        r = time_coconut(config, n, shape, rounds=args.rounds)
        print(f"| {n} | {1e3 * r['train_step_s']:.1f} | {1e3 * r['dual_train_step_s']:.1f} "
              f"| {r['train_step_s'] / r['dual_train_step_s']:.2f}x | {1e3 * r['infer_per_example_s']:.2f} "
              f"| {1e3 * r['dual_infer_per_example_s']:.2f} "
              f"| {r['infer_per_example_s'] / r['dual_infer_per_example_s']:.2f}x | {(n + 1) / 3:.2f}x "
              f"| {1e3 * r['plain_step_s']:.1f} |", flush=True)
    return 0
