"""Training-throughput benchmark: tokens/s, achieved TFLOP/s and estimated MFU per variant.

    python -m pipeline.train.benchmark                          # tiny preset, 2 gloo CPU ranks
    python -m pipeline.train.benchmark --device cuda --preset gpt2-124m-liu \\
        --data runs/gpt2_data --ds-config ds_configs/zero2.json   # one GPU, bf16, S=1024 M=64 N_L=N_A=16

Each variant trains `--steps` optimizer steps through the real loop (`trainer.train`,
DeepSpeed engine, packed data, site sampling); the figures are medians over the
steps after `--warmup`. FLOPs are the task's model-FLOP count (`pipeline.flops`:
matmuls plus attention over visible pairs, every pass, backward only where it
runs), so dual variants count their slots and ahead tokens; "tokens" in tokens/s are the packed sequence tokens. MFU needs a peak:
the GPU's bf16 table entry, or `--peak-tflops` (no reliable CPU peak exists, so
CPU MFU is printed only when you give one). Data: any data-prep directory whose
vocabulary fits the model (default: the quickstart's, `runs/default/data`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

VARIANTS = ["continued_pretraining", "liu", "h1", "h2", "soft_embedding", "pause"]


def _job(preset: str, data: str, ds_path: str, out: str, steps: int, warmup: int, variants: list[str],
         overrides: list[str]) -> list[dict]:
    from pipeline.train.config import load_config
    from pipeline.train.dual_task import DualPretraining
    from pipeline.train.trainer import train

    ds = json.loads(Path(ds_path).read_text())
    rows = []
    for variant in variants:
        run = Path(out) / variant
        cfg = load_config(preset, [f"data.path={data}", f"train.output_dir={run}", f"train.max_steps={steps}",
                                   f"dual.variant={variant}", "train.eval_every=0", "train.eval_sequences=1",
                                   "train.export=false", "tracking.enabled=false", "dual.orthogonality_weight=0",
                                   *overrides])
        result = train(DualPretraining(cfg), ds)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").is_file() else []
        timed = [m for m in metrics if "tokens_per_s" in m][warmup:]
        if timed:
            rows.append({"variant": variant, "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
                         "tflops": statistics.median(m["tflops"] for m in timed),
                         "mfu": statistics.median(m["mfu"] for m in timed) if "mfu" in timed[0] else None,
                         "params": sum(p.numel() for p in result.model.parameters())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-liu", help="pipeline preset; the variant is swept")
    ap.add_argument("--data", default="runs/default/data", help="data-prep directory")
    ap.add_argument("--ds-config", default=None, help="default: zero2_cpu.json on CPU, zero2.json on GPU")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default: 2 on CPU, 1 on GPU)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-rank peak, for MFU on CPU")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value pipeline overrides")
    args = ap.parse_args(argv)
    if not (Path(args.data) / "manifest.json").is_file():
        print(f"error: {args.data} is not a data-prep directory (run scripts/quickstart.sh, or pass --data)",
              file=sys.stderr)
        return 2
    from pipeline.train.testing import run_distributed

    gpu = args.device == "cuda"
    world = args.world_size or (1 if gpu else 2)
    ds = args.ds_config or f"ds_configs/{'zero2' if gpu else 'zero2_cpu'}.json"
    with tempfile.TemporaryDirectory() as out:
        rows = run_distributed(_job, args.preset, str(Path(args.data).resolve()), ds, out, args.steps, args.warmup,
                               args.variants, args.overrides, world_size=world,
                               backend="nccl" if gpu else "gloo")[0]
    print(f"\n{args.preset} on {world} {'GPU' if gpu else 'CPU'} rank(s), {ds}, median of steps "
          f"{args.warmup + 1}-{args.steps}")
    print(f"{'variant':<24}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'vs CP FLOP/s':>14}")
    cp = next((r["tflops"] for r in rows if r["variant"] == "continued_pretraining"), None)
    for r in rows:
        ratio = f"{r['tflops'] / cp:.2f}x" if cp else "n/a"
        mfu = r["mfu"] if r["mfu"] is not None else (
            r["tflops"] / world / args.peak_tflops if args.peak_tflops else None)
        print(f"{r['variant']:<24}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.4f}"
              f"{(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>8}"
              f"{ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
