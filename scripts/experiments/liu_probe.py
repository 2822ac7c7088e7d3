"""Does the frozen Base read what a liu Coprocessor writes? (issue 13)

Trains one dual variant single-process (AdamW, warmup-cosine, the pipeline's data order and
site draws, like liu_sweep.py) and, every steps/6 steps, probes 64 fixed validation
sequences x 8 sites:

- base / aug: ahead NLL of the Base alone and with the latents (nats, mean over N_A);
- Z-swapped: with each site's latents swapped for another site's (does site content matter?);
- Z-mean: with every site given the mean latent (what a constant, pause-like slot gives);
- |Z|, |Z - mean|: latent norm and its site-specific part (the mean is over sites, per slot);
- |dL/dZ|: gradient norm of the ahead loss at the latents;
- draft@1: NLL of x[p+1] under the Coprocessor's own head at slot 1 (its best guess of the
  next token), next to the Base's NLL of the same token.

    python scripts/experiments/liu_probe.py --base runs/default/base/export/base --data runs/default/data

Experimental maps (not pipeline options; each tested here and reported in the README):
`--draft-weight w` adds w x CE(head(Z_j), x[p+1+j]), a direct next-token signal for the
slots; `--slot-input site` adds the site token's embedding to every slot's input;
`--readout actnorm` feeds g*(Z - b) with b, g set from the first batch (Glow's actnorm) and
trained. `--readout vocab` is the pipeline's `dual.latent_readout: vocab` (softmax(head(Z)) @ C,
C trained from the Base's token embeddings); the draft loss became `dual.draft_loss_weight`.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from pipeline.data.shards import load_manifest
from pipeline.dual import DualConfig, DualModel
from pipeline.dual.model import _site_nll, site_targets
from pipeline.models import from_pretrained
from pipeline.train.data import BatchOrder, PackedSequences, site_generator


class ProbedDual(DualModel):
    """A DualModel with the experimental slot inputs and readouts of the module docstring."""

    slot_input = "soft"
    readout = "hidden"
    ids: torch.Tensor | None = None  # the batch, for slot_input=site
    raw: torch.Tensor | None = None  # Z before the readout, for the draft loss
    armed = False  # readout parameters exist (set after the data-dependent init)

    def slot_embeddings(self):
        e = super().slot_embeddings()
        sites = getattr(self, "_sites", None)
        if self.slot_input == "site" and self.ids is not None and sites is not None:
            return e + self.base.embed(self.ids.gather(1, sites)).unsqueeze(2)
        if self.slot_input == "site_hidden" and sites is not None:
            h = self._hidden
            return e + h.gather(1, sites.unsqueeze(-1).expand(-1, -1, h.shape[-1])).unsqueeze(2)
        return e

    def slot_contents(self, sites, cache, base_hidden, docs=None):
        self._sites, self._hidden = sites, base_hidden
        latents, kv, z = self.slots(sites, cache, base_hidden, docs)  # latents: after the pipeline's readout
        self._sites, self.raw = None, z
        if self.readout == "actnorm" and self.armed:
            return (z - self.act_b) * self.act_g, kv
        return latents, kv

    def arm(self, z: torch.Tensor) -> list[torch.nn.Parameter]:
        """Create the readout's parameters (actnorm: from the first batch's latents `z`)."""
        table = self.base.transformer.wte.weight.detach()
        if self.readout == "actnorm":
            self.act_b = torch.nn.Parameter(z.mean((0, 1, 2)).detach().clone())
            self.act_g = torch.nn.Parameter((table.std(0) / z.std((0, 1, 2))).detach().clone())
            new = [self.act_b, self.act_g]
        else:
            new = []
        self.armed = True
        return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/default/base/export/base")
    ap.add_argument("--data", default="runs/default/data")
    ap.add_argument("--variant", default="liu")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--nl", type=int, default=4)
    ap.add_argument("--lm-loss-weight", type=float, default=0.0)
    ap.add_argument("--coprocessor-input", default="kv_cache", choices=["kv_cache", "last_hidden"])
    ap.add_argument("--draft-weight", type=float, default=0.0)
    ap.add_argument("--slot-input", default="soft", choices=["soft", "site", "site_hidden"])
    ap.add_argument("--cop-init", default="base", choices=["base", "identity"],
                    help="identity: zero the Coprocessor's residual-branch output projections, so with "
                         "last_hidden it starts as the identity on the Base's hidden states")
    ap.add_argument("--readout", default="hidden", choices=["hidden", "actnorm", "vocab"])
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    m = load_manifest(args.data)
    train, val = PackedSequences(m, "train", 64), PackedSequences(m, "validation", 64)
    cfg = DualConfig(variant=args.variant, n_latents=args.nl, n_ahead=4, n_sites=8, decode_reread=True,
                     lm_loss_weight=args.lm_loss_weight, coprocessor_input=args.coprocessor_input,
                     latent_readout="vocab" if args.readout == "vocab" else "hidden")
    ProbedDual.slot_input, ProbedDual.readout = args.slot_input, args.readout
    dual = ProbedDual(from_pretrained(args.base), cfg, eos_id=m.eos_id)
    if args.cop_init == "identity":
        with torch.no_grad():
            for block in dual.coprocessor.transformer.h:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()
    order = BatchOrder(len(train), 1234, 8, 1, 1)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = train.batch(order.indices(step, 0, 0))
        return x, dual.sample_sites(x, site_generator(1234, step, 0, 0))

    def ahead_and_draft(x, sites):
        dual.ids = x
        out = dual.base(x, return_kv=True, return_logits=False)
        z, _ = dual.slot_contents(sites, out.kv, out.hidden_states)
        targets = site_targets(x, sites, 4)
        nll = _site_nll(dual.decode_logits(x, sites, 4, out.kv, z, None), targets)
        draft = _site_nll(dual.coprocessor.lm_head(dual.raw), targets.view(*sites.shape, 4)[..., : args.nl])
        return nll, draft, out, z

    with torch.no_grad():
        x0, s0 = batch(0)
        ahead_and_draft(x0, s0)
        extra = dual.arm(dual.raw)  # data-dependent init of the readout, from the first batch
    params = [p for p in dual.parameters() if p.requires_grad] + extra
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    vx = val.batch(list(range(64)))
    vs = dual.sample_sites(vx, torch.Generator().manual_seed(0))

    def probe(step: int) -> None:
        dual.eval()
        with torch.no_grad():
            base = dual.score_sites(vx, vs, k=4, augment=False)
            _, draft, out, z = ahead_and_draft(vx, vs)
        z = z.detach().requires_grad_(True)
        targets = site_targets(vx, vs, 4)

        def nll(latents):
            return _site_nll(dual.decode_logits(vx, vs, 4, out.kv, latents, None), targets).mean()

        aug = nll(z)
        (grad,) = torch.autograd.grad(aug, z)
        with torch.no_grad():
            perm = torch.randperm(z.shape[0] * z.shape[1], generator=torch.Generator().manual_seed(1))
            swapped = float(nll(z.flatten(0, 1)[perm].view_as(z)))
            mean = z.mean((0, 1), keepdim=True)
            constant = float(nll(mean.expand_as(z)))
        print(f"step {step}: base {float(base.mean()):.4f} aug {float(aug):.4f} Z-swapped {swapped:.4f} "
              f"Z-mean {constant:.4f} |Z| {float(z.norm(dim=-1).mean()):.2f} "
              f"|Z - mean| {float((z - mean).norm(dim=-1).mean()):.2f} |dL/dZ| {float(grad.norm()):.2e} "
              f"draft@1 {float(draft[..., 0].mean()):.3f} (Base {float(base[..., 0].mean()):.3f})", flush=True)
        with torch.no_grad():
            per_k = _site_nll(dual.decode_logits(vx, vs, 4, out.kv, z, None), targets).mean((0, 1)) - base.mean((0, 1))
        print(f"  aug - base per k {[round(float(v), 4) for v in per_k]} "
              f"draft per slot {[round(float(v), 3) for v in draft.mean((0, 1))]} "
              f"base per k {[round(float(v), 3) for v in base.mean((0, 1))]}", flush=True)
        dual.train()

    warm = max(1, min(50, args.steps // 10))
    for step in range(args.steps + 1):
        if step % max(1, args.steps // 6) == 0:
            probe(step)
        if step == args.steps:
            break
        t = (step - warm) / max(1, args.steps - warm)
        for group in opt.param_groups:
            group["lr"] = args.lr * (step / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        x, sites = batch(step)
        nll, draft, out, _ = ahead_and_draft(x, sites)
        loss = nll.mean() + args.draft_weight * draft.mean()
        if args.lm_loss_weight:
            loss = loss + args.lm_loss_weight * torch.nn.functional.cross_entropy(
                dual.base.lm_head(out.hidden_states[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


if __name__ == "__main__":
    main()
