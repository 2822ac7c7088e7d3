"""The single-process harness behind the issue-13 measurements: does a liu Coprocessor learn
anything on a small frozen Base? Not the product's training path (that is
`launchers/pretrain.py` under DeepSpeed); a plain AdamW loop over the same model, data order,
site draws and warmup-cosine schedule, small enough to sweep on 2 CPU cores.

    python scripts/experiments/liu_sweep.py --base runs/default/base/export/base --data runs/default/data \\
        [--steps 600] [--lr 1e-3] [--m 8] [--nl 4] [--na 4] [--latent-map none|norm|mixture]

It prints the validation ahead NLL with latents against the Base alone every 200 steps and
a final `RESULT {json}`: the per-k NLL difference (augmented - Base) on fixed validation
sites and a 95% percentile bootstrap interval over sites for its mean.

`--latent-map` tries what the Base reads at the slots (experiments, not pipeline options):
`norm` rescales each latent to the mean norm of the Base's token embeddings (Z's norm is
~12 against ~0.67 for the tokens in use); `mixture` feeds softmax(lm_head(Z)) @ W_emb, the
expected token embedding under the Coprocessor's own next-token distribution.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.shards import load_manifest
from pipeline.dual import DualConfig, DualModel
from pipeline.models import from_pretrained
from pipeline.train.data import BatchOrder, PackedSequences, site_generator


class MappedLatents(DualModel):
    """A DualModel whose slot latents pass through `latent_map` before the Base reads them."""

    latent_map = "none"

    def slots(self, *args, **kwargs):
        z, kv, raw = super().slots(*args, **kwargs)
        if z is None or self.latent_map == "none":
            return z, kv, raw
        table = self.base.transformer.wte.weight
        if self.latent_map == "norm":
            return F.normalize(z, dim=-1) * table.detach().norm(dim=-1).mean(), kv, raw
        return torch.softmax(self.base.lm_head(z).float(), dim=-1) @ table, kv, raw  # mixture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/default/base/export/base")
    ap.add_argument("--data", default="runs/default/data")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--nl", type=int, default=4)
    ap.add_argument("--na", type=int, default=4)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--latent-map", default="none", choices=["none", "norm", "mixture"])
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    manifest = load_manifest(args.data)
    train, val = PackedSequences(manifest, "train", args.seq), PackedSequences(manifest, "validation", args.seq)
    cfg = DualConfig(variant="liu", n_latents=args.nl, n_ahead=args.na, n_sites=args.m, decode_reread=True)
    MappedLatents.latent_map = args.latent_map
    dual = MappedLatents(from_pretrained(args.base), cfg, eos_id=manifest.eos_id)
    params = [p for p in dual.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, min(50, args.steps // 10))  # as resolve_ds_config sets WarmupCosineLR

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * step / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    order = BatchOrder(len(train), 1234, args.batch, 1, 1)
    vx = val.batch(list(range(min(64, len(val)))))
    vs = dual.sample_sites(vx, torch.Generator().manual_seed(0))

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        dual.eval()
        with torch.no_grad():
            aug, base = dual.score_sites(vx, vs, k=args.na), dual.score_sites(vx, vs, k=args.na, augment=False)
        dual.train()
        return aug, base

    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = train.batch(order.indices(step, 0, 0))
        out = dual(x, dual.sample_sites(x, site_generator(1234, step, 0, 0)))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 200 == 0:
            aug, base = evaluate()
            print(f"step {step + 1} train {float(out.loss):.4f} val aug {float(aug.mean()):.4f} "
                  f"base {float(base.mean()):.4f} delta {float((aug - base).mean()):+.4f} ({time.time() - t0:.0f}s)")
    aug, base = evaluate()
    diff = (aug - base).flatten(0, 1).numpy()  # (sites, k)
    rng = np.random.default_rng(0)
    boots = diff[rng.integers(0, len(diff), (1000, len(diff)))].mean(axis=(1, 2))
    print("RESULT", json.dumps({**vars(args), "delta_nll_per_k": [round(float(v), 4) for v in diff.mean(0)],
                                "delta_mean": round(float(diff.mean()), 4),
                                "ci95": [round(float(v), 4) for v in np.percentile(boots, [2.5, 97.5])]}))


if __name__ == "__main__":
    main()
