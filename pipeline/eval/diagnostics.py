"""Latent diagnostics (paper 000 §4.3 and App. C; DESIGN.md §5): do the latents specialise?

**What is collected.** For each of n sites, the Coprocessor's last hidden layer at the
N_L latent slots: Z, its final hidden states after its final norm, from the dual model's
own pass 2 (`DualModel._coprocessor_pass`, the same call training makes). Stacked per
latent that is `X` of shape `(N_L, n, d)`: `X[i]` is the paper's X_i ∈ R^{n×d}.

- liu, h2: Z is exactly what the Base reads back as the slots' input embeddings.
- h1: the Base never reads Z; it reads the Coprocessor's per-layer K/V at the slots,
  which are per layer and per head and so are no single (n, d) tensor per latent. We
  report the same Z as the tensor standing for the latents: it is the Coprocessor's
  output at the slots, computed from the same residual stream that made those K/V, and
  it keeps the three variants comparable. Caveat: in h1 the last layer's attention
  output, MLP and the final norm get no gradient (`DualModel.unused`), so the last step
  from that residual stream to Z is the Coprocessor's initial weights, not trained ones.

Variants without a Coprocessor (continued_pretraining, soft_embedding, pause, a plain
HF checkpoint) fill their slots with learned constants, not functions of the input, so
there is nothing to diagnose: `check_latent_model` says so.

**Sites.** Pretraining data: sites sampled per document (seeded) from the held-out
shards with ppl-at-k's planner (`pipeline.eval.ppl.plan_sites`), at places where the
model's N_A targets fit inside the document, as training draws them. A task file: one
site per example at the question's end, the last token of `prompt_text(example)`, as the
curriculum places the latents: the newline after the question (or the question's last
token, with a tokenizer that drops a trailing newline, as sentencepiece models do).

**Cross-capture** (`cross_capture`): every X_j is centred by its own mean (`centre`, the
one place that choice is made). P_i projects onto the minimal PCA subspace of X_i that
explains ≥ τ of its variance (k_i directions); H[i, j] = ‖X_j P_i‖²_F / ‖X_j‖²_F, so
H[i, i] ≥ τ; H_off = mean of the off-diagonal entries (higher: more redundancy). H
depends on n against d (with n ≤ d, k_i ≤ n − 1), so n and every k_i are reported.

**Silhouette** (`silhouettes`): all n·N_L vectors, uncentred, labelled by latent index;
Euclidean `sklearn.metrics.silhouette_samples`, global mean and per-latent means. Above
`max_points` vectors the same seeded subset of sites is kept for every latent (recorded).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.attention import causal, doc_ids_from_eos, document_causal
from pipeline.errors import PipelineError
from pipeline.eval import ppl as pk
from pipeline.eval.models import EvalModel

log = logging.getLogger(__name__)

CENTRING = "each X_j centred by its own mean over the n sites"
"""How `centre` centres: the paper's "row-centred activations", read per latent."""

PAPER_000 = {
    "large-scale pretraining": {"H_off": 0.9873, "silhouette": -0.1694},
    "GSM8K curriculum": {"H_off": 0.914, "silhouette": -0.031},
    "Countdown op=4": {"H_off": 0.9382, "silhouette": 0.4531},
}
"""Paper 000's reported values (§4.3.1), printed beside ours."""


@dataclasses.dataclass
class DiagnosticsConfig:
    tau: float = 0.97
    """Variance fraction the PCA subspace of each latent must explain."""
    sites: int = 256
    """n: sites collected (pretraining data; a task file gives one per example)."""
    seed: int = 0
    """Seed of the site sampling and of the silhouette subsample."""
    batch_size: int = 8
    """Rows (documents or prompts) per forward."""
    max_points: int = 10_000
    """Silhouette on at most this many vectors (a seeded subset of sites above it)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise PipelineError(f"--tau {self.tau}: must be in (0, 1]")
        if self.sites < 2 or self.batch_size < 1:
            raise PipelineError("--sites must be >= 2 and --batch-size >= 1")
        if self.max_points < 4:
            raise PipelineError("max_points must be >= 4")


# ---------------------------------------------------------------------- collection
def check_latent_model(model: EvalModel) -> None:
    """A `PipelineError` unless the model's latents come from a Coprocessor."""
    if not model.dual.config.spec.has_coprocessor:
        raise PipelineError(
            f"--model {model.path}: variant {model.variant!r} has no latents that depend on the input "
            "(its slots, if any, are learned constants); the diagnostics need a Coprocessor variant "
            "(liu, h1, h2)")


def last_site(models: Sequence[EvalModel]) -> tuple[int, int]:
    """(K, p_max) shared by all models: K = their largest N_A, p_max the last site where
    every model's slots and K targets fit its positions."""
    k = max(m.dual.config.n_ahead for m in models)
    return k, min(m.last_site(k) for m in models)


def plan_pretraining_sites(docs: list[np.ndarray], n_sites: int, k: int, last: int, seed: int) -> pk.SitePlan:
    """About `n_sites` seeded sites spread over the documents: ⌈n/documents⌉ per document
    (all allowed positions where that is too few), then a seeded subset of n."""
    per_doc = max(1, math.ceil(n_sites / len(docs)))
    plan = pk.plan_sites(docs, pk.PplConfig(k=k, sites_per_doc=per_doc, seed=seed), last)
    if len(plan) < n_sites:
        plan = pk.plan_sites(docs, pk.PplConfig(k=k, sites_per_doc=None), last)
    if len(plan) > n_sites:
        keep = np.sort(np.random.default_rng(seed).choice(len(plan), n_sites, replace=False))
        plan = pk.SitePlan(plan.doc[keep], plan.site[keep])
    elif len(plan) < n_sites:
        log.warning("only %d sites fit the documents (asked for %d)", len(plan), n_sites)
    return plan


def plan_rows(docs: list[np.ndarray], plan: pk.SitePlan) -> list[tuple[np.ndarray, np.ndarray]]:
    """One row per document: its tokens up to its last planned site, and its sites (the
    plan's order, which is grouped by document and sorted within it)."""
    rows = []
    for d in dict.fromkeys(plan.doc.tolist()):
        sites = plan.site[plan.doc == d]
        rows.append((docs[d][: int(sites[-1]) + 1], sites))
    return rows


def prompt_rows(prompts: Sequence[Sequence[int]], last: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One row per prompt, its one site at the prompt's last token; a prompt longer than
    `last + 1` tokens keeps its last `last + 1` (as the GSM8K evaluation cuts them)."""
    rows, cut = [], 0
    for i, ids in enumerate(prompts):
        if not len(ids):
            raise PipelineError(f"example {i}: empty prompt")
        if len(ids) > last + 1:
            cut += 1
            ids = ids[-(last + 1):]
        rows.append((np.asarray(ids, dtype=np.int64), np.array([len(ids) - 1])))
    if cut:
        log.warning("%d of %d prompts cut to their last %d tokens (the model's positions)", cut, len(rows), last + 1)
    return rows


@torch.no_grad()
def collect_latents(model: EvalModel, rows: Sequence[tuple[np.ndarray, np.ndarray]], *, batch_size: int = 8,
                    pad_id: int = 0, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """X `(N_L, n, d)` (fp32): Z at every site of `rows` (tokens, sorted sites), in row order.

    Passes 1 and 2 of the dual model, batched over rows; a row's tokens need only reach its
    last site (both passes are causal up to each site), so rows are right-padded.
    """
    check_latent_model(model)
    dual = model.dual
    offsets = np.cumsum([0] + [len(s) for _, s in rows])
    n_l, d = dual.config.n_latents, dual.base.config.d_model
    out = np.zeros((n_l, int(offsets[-1]), d), dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))  # similar lengths together
    done = 0
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        seq = max(len(rows[r][0]) for r in batch)
        width = max(len(rows[r][1]) for r in batch)
        ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
        sites = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            tokens, s = rows[r]
            ids[j, : len(tokens)] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            sites[j, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
            sites[j, len(s):] = int(s[-1])  # padding sites repeat the last one (kept sorted)
        ids, sites = ids.to(model.device), sites.to(model.device)
        docs = doc_ids_from_eos(ids, dual.eos_id) if dual.config.document_mask else None
        mask = causal(ids.shape[1]) if docs is None else document_causal(docs)
        base = dual.base(ids, attention=mask, return_kv=True, return_logits=False)  # pass 1
        z, _ = dual._coprocessor_pass(sites, base.kv, base.hidden_states, docs)  # pass 2: (B, M, N_L, d)
        z = z.float().cpu().numpy()
        for j, r in enumerate(batch):
            a, e = offsets[r], offsets[r + 1]
            out[:, a:e] = z[j, : e - a].transpose(1, 0, 2)
            done += int(e - a)
        if progress is not None:
            progress(done, int(offsets[-1]))
    return out


# ---------------------------------------------------------------------- cross-capture
def centre(x: np.ndarray) -> np.ndarray:
    """The one place the cross-capture's centring is decided (`CENTRING`): X_j `(..., n, d)`
    minus its own mean over the n sites, so H compares directions of variation and not the
    latents' offsets (a latent's mean would otherwise dominate its first direction)."""
    return x - x.mean(axis=-2, keepdims=True)


@dataclasses.dataclass
class CrossCapture:
    H: np.ndarray
    """`(N_L, N_L)`: H[i, j] is the fraction of latent j's variance in latent i's subspace."""
    k: np.ndarray
    """`(N_L,)` dimension of each latent's τ-subspace."""
    n: np.ndarray
    """`(N_L,)` vectors per latent."""

    @property
    def h_off(self) -> float | None:
        """Mean off-diagonal entry (None for a single latent)."""
        m = len(self.H)
        return None if m < 2 else float(self.H[~np.eye(m, dtype=bool)].mean())


def subspaces(gram: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Projectors P_i `(N_L, d, d)` and dimensions k_i `(N_L,)` of the minimal PCA subspaces
    explaining ≥ tau of each latent's variance, from the Gram matrices X_iᵀX_i `(N_L, d, d)`
    of the centred latents (their eigenvectors are the principal directions)."""
    var, vec = np.linalg.eigh(gram)  # ascending
    var, vec = np.clip(var[:, ::-1], 0.0, None), vec[:, :, ::-1]  # descending: var (N_L, d), vec (N_L, d, d)
    total = var.sum(-1, keepdims=True)
    if np.any(total[:, 0] <= 0):
        raise PipelineError(f"latent(s) {np.flatnonzero(total[:, 0] <= 0).tolist()} do not vary over the "
                            "sites; cross-capture is undefined")
    explained = np.cumsum(var, -1) / total
    k = np.minimum((explained < tau - 1e-12).sum(-1) + 1, var.shape[-1])  # first k reaching tau
    basis = vec * (np.arange(var.shape[-1]) < k[:, None])[:, None, :]  # columns past k_i zeroed
    return basis @ basis.transpose(0, 2, 1), k


def cross_capture(x: np.ndarray, tau: float = 0.97) -> CrossCapture:
    """H of latents `x` `(N_L, n, d)`, all pairs at once: ‖X_j P_i‖²_F = ⟨P_i, X_jᵀX_j⟩_F and
    ‖X_j‖²_F = tr(X_jᵀX_j), in float64; memory N_L·d² whatever n."""
    if x.ndim != 3 or x.shape[1] < 2:
        raise PipelineError(f"latents of shape {x.shape}: expected (N_L, n >= 2, d)")
    xc = centre(x.astype(np.float64))
    gram = xc.transpose(0, 2, 1) @ xc  # X_jᵀX_j (N_L, d, d)
    proj, k = subspaces(gram, tau)
    captured = np.einsum("iab,jab->ij", proj, gram)
    h = captured / np.trace(gram, axis1=1, axis2=2)[None, :]
    return CrossCapture(H=np.clip(h, 0.0, 1.0), k=k, n=np.full(len(x), x.shape[1]))


# ---------------------------------------------------------------------- silhouette
def silhouettes(x: np.ndarray, *, max_points: int = 10_000, seed: int = 0) -> dict[str, Any] | None:
    """Euclidean silhouette of all vectors of `x` `(N_L, n, d)` labelled by latent index:
    `global` (mean over points) and `per_latent` means; None for a single latent."""
    from sklearn.metrics import silhouette_samples

    n_l, n, _ = x.shape
    if n_l < 2:
        return None
    rows = np.arange(n)
    if n_l * n > max_points:  # the same sites for every latent, so the clusters stay paired
        rows = np.sort(np.random.default_rng(seed).choice(n, max(2, max_points // n_l), replace=False))
    pts = x[:, rows].reshape(-1, x.shape[-1]).astype(np.float64)
    labels = np.repeat(np.arange(n_l), len(rows))
    s = silhouette_samples(pts, labels, metric="euclidean")
    return {"global": float(s.mean()), "per_latent": [float(s[labels == i].mean()) for i in range(n_l)],
            "n_points": int(len(pts)), "subsampled": len(rows) < n, "max_points": max_points, "seed": seed}


# ---------------------------------------------------------------------- results
def summarize(model: EvalModel, x: np.ndarray, cfg: DiagnosticsConfig) -> dict[str, Any]:
    """One model's entry of the results: H, k_i, n_i, H_off and the silhouettes."""
    cc = cross_capture(x, cfg.tau)
    sil = silhouettes(x, max_points=cfg.max_points, seed=cfg.seed)
    return {
        **model.describe(), "d": int(x.shape[-1]),
        "latent_tensor": "coprocessor final hidden state Z at the slots (after its final norm)",
        "H": cc.H.tolist(), "H_off": cc.h_off, "k": cc.k.tolist(), "n": cc.n.tolist(),
        "silhouette": sil["global"] if sil else None, "silhouette_per_latent": sil["per_latent"] if sil else None,
        "silhouette_points": sil and {key: sil[key] for key in ("n_points", "subsampled", "max_points", "seed")},
    }


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| model | variant | N_L | d | n | k_i | H_off | silhouette |", "|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        h_off = "–" if m["H_off"] is None else f"{m['H_off']:.4f}"
        sil = "–" if m["silhouette"] is None else f"{m['silhouette']:+.4f}"
        lines.append(f"| {m['name']} | {m['variant']} | {m['n_latents']} | {m['d']} | {m['n'][0]} | "
                     f"{' '.join(map(str, m['k']))} | {h_off} | {sil} |")
    subsets = [f"{m['name']}: {m['silhouette_points']['n_points']} points" for m in results["models"]
               if m["silhouette_points"] and m["silhouette_points"]["subsampled"]]
    if subsets:
        lines += ["", f"Silhouettes on a seeded subset of sites ({'; '.join(subsets)})."]
    lines += ["", f"τ = {results['tau']}; {CENTRING}. Paper 000: "
              + "; ".join(f"{k} H_off {v['H_off']}, s = {v['silhouette']}" for k, v in PAPER_000.items()) + "."]
    return "\n".join(lines) + "\n"


def save_latents(path: str | Path, latents: dict[str, np.ndarray], sites: np.ndarray) -> Path:
    """`--dump-latents`: an .npz with `names`, `latents_<i>` `(N_L, n, d)` per model, and
    `sites` `(n, 2)` (document or example index, site position), no pickles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"latents_{i}": x for i, x in enumerate(latents.values())}
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, names=np.array(list(latents)), sites=np.asarray(sites, dtype=np.int64), **arrays)
    return path


def load_latents(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What `save_latents` wrote: ({model name: X (N_L, n, d)}, sites (n, 2))."""
    with np.load(path, allow_pickle=False) as f:
        names = [str(n) for n in f["names"]]
        return {n: f[f"latents_{i}"] for i, n in enumerate(names)}, f["sites"]
