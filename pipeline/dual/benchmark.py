"""Speed of the packed three-pass step against the per-site loop and a plain LM step.

    python launchers/benchmark.py dual                          # CPU, gpt2-tiny, S=256, N_L=N_A=8
    python launchers/benchmark.py dual --sites 1 4 16 64 --variant liu
    python launchers/benchmark.py dual --device cuda            # bf16, + decode pass flex vs dense

One step = the variant's loss, backward, AdamW on its trainable parameters
(`--no-optimizer`: loss and backward only).
"packed" is `DualModel.forward` (all M sites at once); "loop" is the per-site
reference (`pipeline.dual.reference`, one site at a time); "plain" is a causal-LM
step of the same Base on the same batch. FLOPs are model FLOPs, counted by
torch's FlopCounterMode on the step actually run: every matmul, plus attention
over the query-key pairs the mask lets through at `pipeline.flops`' per-pair cost
(2 x 2 x head_dim per pair forward, twice that backward), the convention the
trainer and the model benchmark use. Pairs a kernel computes only to mask them out are
not credited, so achieved FLOP/s says how much of the time goes to useful work,
the same yardstick for the packed and the plain step. At small M the two extra
passes carry few FLOPs but a full pass's per-op overhead (on a 2-core CPU, gpt2-tiny,
~1 ms per forward pass of 8 tokens), so the ratio grows with M and with model width.
`--breakdown` profiles forward+backward by kind of op (matmul, attention, the
rest) and prints each kind's time and FLOP rate, which says whether the packed
step is slow per FLOP or just does more non-matmul work per FLOP than the plain step.
On CUDA (bf16) attention FLOPs are torch's own formulas (dense for SDPA), and a
second table times the decode pass (pass 3, forward + backward) with FlexAttention
against SDPA with a dense mask at S=1024, M=64, N_L=N_A=16 (`--decode-*`), the
shape where the dense mask's cross-block work dominates.
Nothing is asserted: this prints figures.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from pipeline.dual.config import DualConfig
from pipeline.dual.model import DualModel, site_targets
from pipeline.dual.reference import naive_loss
from pipeline.flops import ATTENTION_BACKWARD_FACTOR, attention_pair_flops
from pipeline.models import build_model, preset
from pipeline.models.benchmark import time_interleaved


def _step(params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor],
          optimizer: bool = True) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step() -> None:
        loss_fn().backward()
        if optimizer:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _visible_pairs(q: Tensor, k: Tensor, is_causal: bool, attn_mask: Tensor | None) -> int:
    """Query-key pairs an attention call lets through, over all batch rows and heads."""
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if attn_mask is not None:
        seen = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        return int(seen.expand(b, h, lq, lk).sum())
    if is_causal:  # top-left aligned: query i sees keys 0..i
        return int(torch.arange(1, lq + 1).clamp(max=lk).sum()) * b * h
    return b * h * lq * lk


def _cpu_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None,
                         out_val=None) -> int:
    """Forward model FLOPs of one SDPA call: `pipeline.flops`' per-pair cost x visible pairs."""
    pairs = _visible_pairs(query, key, is_causal, attn_mask)
    return pairs * attention_pair_flops(query.shape[-1], value.shape[-1])


def _cpu_attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *,
                                  attn_mask=None, scale=None, out_val=None) -> int:
    forward = _cpu_attention_flops(query, key, value, is_causal=is_causal, attn_mask=attn_mask)
    return ATTENTION_BACKWARD_FACTOR * forward


_cpu_attention_flops._get_raw = True  # FlopCounterMode: pass tensors, not shapes (the mask is needed)
_cpu_attention_backward_flops._get_raw = True
_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _count_flops(fn: Callable[[], None]) -> int:
    """Model FLOPs of one call of `fn`: matmuls + attention over visible pairs."""
    return sum(_flops_by_kind(fn).values())


def _kind(op_name: str) -> str:
    """'attention' for attention kernels (and the two-part path's autograd nodes), 'matmul'
    for the GEMMs, 'other' for the rest (norms, activations, copies, losses, dispatch)."""
    if "attention" in op_name.lower():
        return "attention"
    return "matmul" if op_name.removeprefix("aten::").removeprefix("aten.") in _MATMULS else "other"


_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation")
KINDS = ("matmul", "attention", "other")


def _flops_by_kind(fn: Callable[[], None]) -> dict[str, int]:
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)
    with counter:
        fn()
    flops = dict.fromkeys(KINDS, 0)
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        flops[_kind(str(op))] += n
    return flops


def _time_by_kind(fn: Callable[[], None], steps: int) -> dict[str, float]:
    """Seconds per call of `fn` by kind of op: the profiler's self CPU time of every op."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    seconds = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        seconds[_kind(event.key)] += event.self_cpu_time_total / 1e6 / steps
    return seconds


def _breakdown(rows: list[tuple[str, Callable[[], None]]], steps: int) -> None:
    """Where forward+backward time goes, and at what rate each kind of op does its FLOPs."""
    print(f"\nbreakdown of forward+backward (no optimizer), profiler self CPU time over {steps} steps; "
          "GFLOP/s = model FLOPs of that kind / its time")
    print(f"{'step':<12}" + "".join(f"{kind + ' ms':>13} {'GFLOP/s':>8}" for kind in KINDS[:2])
          + f"{'other ms':>10} {'share':>6} {'total ms':>9}")
    for name, fn in rows:
        flops, sec = _flops_by_kind(fn), _time_by_kind(fn, steps)
        total = sum(sec.values())
        cols = "".join(f"{sec[k] * 1e3:>13.2f} {flops[k] / sec[k] / 1e9 if sec[k] else 0:>8.1f}" for k in KINDS[:2])
        print(f"{name:<12}{cols}{sec['other'] * 1e3:>10.2f} {sec['other'] / total:>6.0%} {total * 1e3:>9.2f}",
              flush=True)


def _decode_pass(dual: DualModel, x: Tensor, sites: Tensor) -> Callable[[], None]:
    """Forward + backward of pass 3 alone, on a fixed cache and fixed slot contents."""
    with torch.no_grad():
        out = dual.base(x, return_kv=True, return_logits=False)
        latents, extra_kv = dual.slot_contents(sites, out.kv, out.hidden_states)
    if latents is not None:
        latents.requires_grad_(True)
    n_ahead = dual.config.n_ahead
    targets = site_targets(x, sites, n_ahead)

    def step() -> None:
        logits = dual.decode_logits(x, sites, n_ahead, out.kv, latents, extra_kv)
        F.cross_entropy(logits.float().flatten(0, 2), targets.flatten()).backward()

    return step


def _decode_table(args, device: torch.device, dtype: torch.dtype) -> None:
    seq, m, n = args.decode_seq, args.decode_sites, args.decode_latents
    cfg_model = preset(args.preset, max_position_embeddings=max(seq + 2 * n + 1, 128))
    torch.manual_seed(0)
    base = build_model(cfg_model).to(device, dtype)
    x = torch.randint(0, cfg_model.vocab_size, (args.batch, seq), device=device)
    steps, memory = {}, {}
    for backend in args.decode_backends:
        cfg = DualConfig(variant=args.variant, n_latents=n, n_ahead=n, n_sites=m, attention_backend=backend)
        dual = DualModel(base, cfg, eos_id=None)
        sites = dual.sample_sites(x.cpu(), torch.Generator().manual_seed(0)).to(device)
        steps[backend] = _decode_pass(dual, x, sites)
    times = time_interleaved(steps, rounds=args.rounds, warmup=1, device=device, burst=args.burst)
    for backend, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            memory[backend] = torch.cuda.max_memory_allocated() / 2**30
    print(f"\ndecode pass (pass 3) forward+backward, {args.preset} {str(dtype).removeprefix('torch.')}, "
          f"B={args.batch} S={seq} M={m} N_L=N_A={n}")
    dense = times.get("sdpa")
    for backend, sec in times.items():
        vs = f"{dense / sec:.2f}x vs dense (target >= 3x for flex)" if dense and backend != "sdpa" else ""
        mem = f"{memory[backend]:.2f} GiB peak" if backend in memory else ""
        print(f"  {backend:<5} {sec * 1e3:>9.2f} ms  {mem:<14} {vs}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py dual", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-tiny", help="model preset of the Base (and Coprocessor)")
    ap.add_argument("--variant", default="h2", help="dual variant (h2 trains everything, like the plain step)")
    ap.add_argument("--seq", type=int, default=256, help="sequence length S")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--n-latents", type=int, default=8)
    ap.add_argument("--n-ahead", type=int, default=8)
    ap.add_argument("--sites", type=int, nargs="+", default=[1, 4, 16, 64], help="values of M")
    ap.add_argument("--rounds", type=int, default=5, help="turns per candidate (median step reported)")
    ap.add_argument("--burst", type=int, default=4,
                    help="steps per turn, the first untimed (1 = alternate every step, caches cold)")
    ap.add_argument("--no-loop", action="store_true", help="skip the (slow) per-site loop")
    ap.add_argument("--no-optimizer", action="store_true",
                    help="time forward+backward only (h2 updates two models, the plain step one)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile forward+backward by kind of op (matmul, attention, other); CPU only")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16 and the decode table")
    ap.add_argument("--decode", action="store_true", help="print the decode-pass table on CPU too")
    ap.add_argument("--decode-backends", nargs="+", default=["flex", "sdpa"], choices=["flex", "sdpa"],
                    help="attention backends of the decode table (flex has no CPU backward)")
    ap.add_argument("--decode-seq", type=int, default=1024)
    ap.add_argument("--decode-sites", type=int, default=64)
    ap.add_argument("--decode-latents", type=int, default=16, help="N_L = N_A of the decode table")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.breakdown and device.type != "cpu":
        print("error: --breakdown reads the profiler's CPU time; it is for --device cpu", file=sys.stderr)
        return 2
    if args.decode and device.type == "cpu" and "flex" in args.decode_backends:
        print("error: FlexAttention has no backward on CPU; use --decode-backends sdpa or --device cuda",
              file=sys.stderr)
        return 2
    cfg_model = preset(args.preset, max_position_embeddings=max(args.seq + args.n_latents + args.n_ahead + 1, 128))
    print(f"device {device} {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
          f"preset {args.preset}, variant {args.variant}, "
          f"B={args.batch} S={args.seq} N_L={args.n_latents} N_A={args.n_ahead}")
    print(f"{'M':>4} {'packed ms':>10} {'loop ms':>10} {'speedup':>8} {'target':>7} "
          f"{'packed GFLOP/s':>15} {'plain GFLOP/s':>14} {'ratio':>6}")
    profiled: list[tuple[str, Callable[[], None]]] = []
    for m in args.sites:
        base = build_model(cfg_model).to(device, dtype)
        dual = DualModel(base, DualConfig(variant=args.variant, n_latents=args.n_latents, n_ahead=args.n_ahead,
                                          n_sites=m), eos_id=None)
        x = torch.randint(0, cfg_model.vocab_size, (args.batch, args.seq))
        sites = dual.sample_sites(x, torch.Generator().manual_seed(m)).to(device)
        x = x.to(device)
        trainable = [p for p in dual.parameters() if p.requires_grad]
        plain_base = copy.deepcopy(dual.base).requires_grad_(True)  # the plain step trains a whole Base

        def plain_loss(base=plain_base, x=x):
            logits = base(x).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

        opt = not args.no_optimizer
        steps = {"packed": _step(trainable, lambda d=dual, x=x, s=sites: d(x, s).loss, opt),
                 "plain": _step(list(plain_base.parameters()), plain_loss, opt)}
        if not args.no_loop:
            steps["loop"] = _step(trainable, lambda d=dual, x=x, s=sites: naive_loss(d, x, s), opt)
        flops = {name: _count_flops(step) for name, step in steps.items() if name != "loop"}
        times = time_interleaved(steps, rounds=args.rounds, warmup=1, device=device, burst=args.burst)
        packed_gfs = flops["packed"] / times["packed"] / 1e9
        plain_gfs = flops["plain"] / times["plain"] / 1e9
        loop = f"{times['loop'] * 1e3:>10.1f}" if "loop" in times else f"{'-':>10}"
        speedup = f"{times['loop'] / times['packed']:>7.1f}x" if "loop" in times else f"{'-':>8}"
        target = f"{m / 2:>6.1f}x" if m == 16 else f"{'-':>7}"  # the target: >= M/2 at M = 16
        print(f"{m:>4} {times['packed'] * 1e3:>10.1f} {loop} {speedup} {target} "
              f"{packed_gfs:>15.2f} {plain_gfs:>14.2f} {packed_gfs / plain_gfs:>6.2f}", flush=True)
        if args.breakdown:
            if not profiled:
                profiled.append(("plain", _step(list(plain_base.parameters()), plain_loss, optimizer=False)))
            profiled.append((f"packed M={m}", _step(trainable, lambda d=dual, x=x, s=sites: d(x, s).loss, False)))
    if profiled:
        _breakdown(profiled, steps=max(args.rounds, 3))
    if device.type == "cuda" or args.decode:
        _decode_table(args, device, dtype)
    return 0
