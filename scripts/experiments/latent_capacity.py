"""How much can a frozen Base read from its latent slots at all? (issue 13)

Free latents: for fixed validation sites, the N_L slot embeddings of every site are
parameters of their own, optimized by Adam directly against that site's ahead targets
with the Base frozen. No Coprocessor can write better latents than these (they see the
answer), so the NLL they reach bounds what any liu Coprocessor can gain on this Base.

    python scripts/experiments/latent_capacity.py --base runs/default/base/export/base --data runs/default/data

Prints, per k, the Base-alone NLL and the NLL with free latents after --steps Adam
steps, and the latents' norm against the Base's token embeddings. An experiment, not a
pipeline stage.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from pipeline.data.shards import load_manifest
from pipeline.dual import DualConfig, DualModel
from pipeline.models import from_pretrained
from pipeline.train.data import PackedSequences


class FreeLatents(DualModel):
    def slots(self, sites, cache, base_hidden, docs=None):
        return self.free, None, None  # (latents the Base reads, extra K/V, Coprocessor output)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/default/base/export/base")
    ap.add_argument("--data", default="runs/default/data")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--nl", type=int, default=4)
    ap.add_argument("--na", type=int, default=4)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--no-reread", action="store_true")
    ap.add_argument("--init", default="tokens", choices=["tokens", "zero", "answer"],
                    help="start at random token embeddings, at zero, or at the embeddings of the site's "
                         "own ahead tokens (slot j = x[p+1+j]: a perfect draft; --steps 0 scores it as is)")
    ap.add_argument("--init-scale", type=float, default=1.0, help="multiply the initial latents")
    ap.add_argument("--learned-code", action="store_true",
                    help="instead of per-site latents: slot j reads C[x[p+1+j]] from one table C (init: the "
                         "Base's token embeddings), trained on training-split sites and scored on the "
                         "validation sites: what a perfect draft is worth through a learned code")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    manifest = load_manifest(args.data)
    val = PackedSequences(manifest, "validation", args.seq)
    cfg = DualConfig(variant="pause", n_latents=args.nl, n_ahead=args.na, n_sites=args.m,
                     decode_reread=not args.no_reread)
    dual = FreeLatents(from_pretrained(args.base), cfg, eos_id=manifest.eos_id)
    dual.requires_grad_(False)
    x = val.batch(list(range(min(args.sequences, len(val)))))
    sites = dual.sample_sites(x, torch.Generator().manual_seed(0))
    table = dual.base.embed(torch.arange(manifest.vocab_size))
    tok_norm = float(table.norm(dim=-1).mean())
    B, M = sites.shape
    d = dual.base.config.d_model
    if args.init == "tokens":
        init = dual.base.embed(torch.randint(0, table.shape[0], (B, M, args.nl)))
    elif args.init == "answer":
        ahead = sites.unsqueeze(-1) + 1 + torch.arange(args.nl)
        init = dual.base.embed(x.gather(1, ahead.flatten(1))).view(B, M, args.nl, d)
    else:
        init = torch.zeros(B, M, args.nl, d)
    init = init * args.init_scale
    dual.free = torch.nn.Parameter(init.detach().clone())
    base_nll = dual.score_sites(x, sites, k=args.na, augment=False)
    if args.learned_code:
        return learned_code(args, dual, manifest, x, sites, base_nll)
    opt = torch.optim.Adam([dual.free], lr=args.lr)
    for step in range(args.steps + 1):
        out = dual(x, sites)
        if step % 50 == 0:
            print(f"step {step} ahead nll {float(out.ahead_loss):.4f} (Base alone {float(base_nll.mean()):.4f}) "
                  f"latent norm {float(dual.free.norm(dim=-1).mean()):.2f} (tokens {tok_norm:.2f})", flush=True)
        if step == args.steps:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        aug = dual(x, sites).nll
    print("RESULT", json.dumps({**vars(args), "base_nll_per_k": [round(float(v), 4) for v in base_nll.mean((0, 1))],
                                "free_nll_per_k": [round(float(v), 4) for v in aug.mean((0, 1))],
                                "latent_norm": round(float(dual.free.norm(dim=-1).mean()), 3),
                                "token_norm": round(tok_norm, 3)}))


def learned_code(args, dual, manifest, x, sites, base_nll) -> None:
    from pipeline.train.data import BatchOrder, site_generator

    train = PackedSequences(manifest, "train", args.seq)
    del dual.free  # per-site latents are replaced by the code's rows
    code = torch.nn.Embedding.from_pretrained(dual.base.transformer.wte.weight.detach().clone(), freeze=False)
    order = BatchOrder(len(train), 1234, 8, 1, 1)

    def drafts(ids, s):
        ahead = s.unsqueeze(-1) + 1 + torch.arange(args.nl)
        return code(ids.gather(1, ahead.flatten(1))).view(*s.shape, args.nl, -1)

    opt = torch.optim.Adam(code.parameters(), lr=args.lr)
    for step in range(args.steps + 1):
        if step % 100 == 0:
            with torch.no_grad():
                dual.free = drafts(x, sites)
                val = float(dual(x, sites).ahead_loss)
            print(f"step {step} held-out ahead nll {val:.4f} (Base alone {float(base_nll.mean()):.4f})", flush=True)
        if step == args.steps:
            break
        ids = train.batch(order.indices(step, 0, 0))
        s = dual.sample_sites(ids, site_generator(1234, step, 0, 0))
        dual.free = drafts(ids, s)
        loss = dual(ids, s).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        dual.free = drafts(x, sites)
        aug = dual(x, sites).nll
    print("RESULT", json.dumps({**vars(args), "base_nll_per_k": [round(float(v), 4) for v in base_nll.mean((0, 1))],
                                "learned_code_nll_per_k": [round(float(v), 4) for v in aug.mean((0, 1))]}))


if __name__ == "__main__":
    main()
