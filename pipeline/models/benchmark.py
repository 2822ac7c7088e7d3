"""Training-step speed of our models beside `transformers`' own, same config/batch/precision.

    python launchers/benchmark.py model                       # CPU: gpt2-tiny, gpt2-124m
    python launchers/benchmark.py model --presets qwen3-tiny --steps 5
    python launchers/benchmark.py model --device cuda         # bf16, flex and sdpa backends

One step = forward, cross-entropy, backward, AdamW step; candidates are timed
round-robin and the median step is reported. Figures: tokens/s,
achieved TFLOP/s and, on GPU, MFU against the dense bf16 peak. FLOPs are
`pipeline.flops.training_flops_per_token`: 6 N (N the matmul parameters) plus
causal attention over the query-key pairs the mask lets through, the count the
trainer and the dual benchmark use. (Before, this was the PaLM/nanoGPT count,
6 N + 12 L T d per token, which credits every pair; the attention term here is
about half that, so TFLOP/s and MFU read lower than earlier runs of this tool.)
This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.attention import causal
from pipeline.flops import (
    mfu,
    peak_tflops,
    training_flops_per_token,
)
from pipeline.models.config import ModelConfig, preset
from pipeline.models.registry import build_model

DEFAULT_SHAPES = {"gpt2-124m": (4, 256), "qwen3-0.6b": (4, 256)}
"""(batch, seq) per preset; tiny presets use (8, 64)."""
TINY_ROUNDS = 30
"""Timed steps for tiny presets when --steps is not given (their steps take milliseconds)."""


def flops_per_token(model: torch.nn.Module, config: ModelConfig, seq: int) -> float:
    """Training FLOPs per token of one step of `model` on `seq`-token sequences (`pipeline.flops`)."""
    n = model.num_params(matmul_only=True) if hasattr(model, "num_params") else 0
    return training_flops_per_token(n, config.n_layer, config.n_head, config.head_dim, seq)


def _hf_model(config: ModelConfig, attn: str):
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    return transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn)


def make_step(model: torch.nn.Module, forward: Callable, inputs: torch.Tensor,
              targets: torch.Tensor) -> Callable[[], None]:
    """One training step of `model`: forward, cross-entropy, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    model.train()

    def step() -> None:
        logits = forward(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                     device: torch.device, burst: int = 1) -> dict[str, float]:
    """Median seconds per step of each candidate, timed round-robin.

    Alternating the candidates means a noisy neighbour on a shared machine slows
    all of them alike instead of whichever happened to run then. With `burst` > 1
    each turn runs `burst` steps back to back and times all but the first, the
    way training repeats one step: caches warm with that step's own weights and
    activations rather than the previous candidate's.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            for i in range(burst):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= warmup and (i > 0 or burst == 1):
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(preset_name: str, device: torch.device, rounds: int, warmup: int, shape: tuple[int, int] | None,
        peak: float | None, with_hf: bool) -> list[dict]:
    config = preset(preset_name)
    batch, seq = shape or DEFAULT_SHAPES.get(preset_name, (8, 64))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = build_model(config).to(device, dtype)
    fpt = flops_per_token(ours, config, seq)
    candidates: list[tuple[str, torch.nn.Module, Callable]] = []
    backends = ["flex", "sdpa"] if device.type == "cuda" else ["sdpa"]
    for backend in backends:
        def fwd(ids, backend=backend, model=ours):
            return model(ids, attention=causal(ids.shape[1], backend=backend)).logits
        candidates.append((f"ours[{backend}]", ours, fwd))
    if with_hf:
        for attn in (["sdpa", "eager"] if device.type == "cuda" else ["sdpa"]):
            hf = _hf_model(config, attn).to(device, dtype)
            candidates.append((f"transformers[{attn}]", hf, lambda ids, m=hf: m(input_ids=ids).logits))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g).to(device)
    steps = {name: make_step(model, fwd, x[:, :-1], x[:, 1:]) for name, model, fwd in candidates}
    seconds = time_interleaved(steps, rounds, warmup, device)
    rows = []
    for name, sec in seconds.items():
        tps = batch * seq / sec
        tflops = fpt * tps / 1e12
        rows.append(dict(preset=preset_name, impl=name, device=device.type, dtype=str(dtype)[6:],
                         shape=f"{batch}x{seq}", step_ms=sec * 1e3, tokens_s=tps, tflops=tflops,
                         mfu=mfu(tflops, peak, world=1)))
    ref = next((r["tokens_s"] for r in rows if r["impl"] == "transformers[eager]"), None) or next(
        (r["tokens_s"] for r in rows if r["impl"].startswith("transformers")), None)
    for r in rows:
        r["vs_hf"] = r["tokens_s"] / ref if ref else None
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py model", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="gpt2-tiny,gpt2-124m", help="comma-separated preset names")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed steps per model, median reported (default 3; {TINY_ROUNDS} for tiny presets)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    ap.add_argument("--shape", default=None, help="BATCHxSEQ for every preset (default: per preset)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU here")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
    peak = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# model training step (fwd+bwd+AdamW), {where}, torch {torch.__version__}"
          + (f", peak {peak:.0f} TFLOP/s bf16" if peak else ""))
    header = f"{'preset':<12} {'impl':<22} {'dtype':<9} {'BxT':<8} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'vs HF':>6}"
    print(header)
    for name in args.presets.split(","):
        name = name.strip()
        rounds = args.steps or (TINY_ROUNDS if name.endswith("-tiny") else 3)
        for r in run(name, device, rounds, args.warmup, shape, peak, not args.no_hf):
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            vs = f"{r['vs_hf']:.2f}x" if r["vs_hf"] is not None else "-"
            print(f"{r['preset']:<12} {r['impl']:<22} {r['dtype']:<9} {r['shape']:<8} {r['step_ms']:>9.1f} "
                  f"{r['tokens_s']:>10.0f} {r['tflops']:>8.3f} {mfu:>6} {vs:>6}", flush=True)
    return 0
