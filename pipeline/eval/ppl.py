"""Perplexity of the k-th token after augmentation (paper 002, Table 1).

For a site p in a validation document, the model augments at p (Base pass on x[0..p],
Coprocessor, N_L latents) and then reads x[p+1 .. p+k-1]; the k-th token's NLL is
-log p(x[p+k]). ppl@k = exp(mean NLL over sites), for k = 1..K, next to the Base alone
on the same contexts and the relative reduction 100·(ppl_base − ppl)/ppl_base, each with
a paired percentile-bootstrap interval over sites (`pipeline.eval.bootstrap`).

Every site is scored inside its own document (no packing neighbours), so its context
is exactly x[0..p] of that document, and one dump line can be re-scored on its own.
Several sites of one document share a row (the scorer's passes are causal up to each
site); rows of similar length are batched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.eval.bootstrap import paired_ppl_bootstrap
from pipeline.eval.models import EvalModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PplConfig:
    k: int = 32
    """K: score the 1st .. K-th token after each site."""
    sites_per_doc: int | None = 8
    """Sites sampled per document (seeded); None = every allowed position (as paper 002)."""
    seed: int = 0
    """Seed of the site sampling."""
    min_context: int = 1
    """Sites start at position min_context - 1 (context of at least this many tokens)."""
    batch_size: int = 4
    """Rows per forward; a row is one document (prefix) with up to `sites_per_row` sites."""
    sites_per_row: int = 16
    """Sites scored in one row (bounds the decode pass: sites_per_row · (N_L + K) queries)."""
    n_resamples: int = 1000
    """Bootstrap resamples of the sites for the intervals (`pipeline.eval.bootstrap`)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling (independent of `seed`, the site sampling)."""
    level: float = 0.95
    """Coverage of the percentile intervals."""
    window: int | None = None
    """Sites keep their context and the k scored tokens inside this many tokens (p + k < window):
    None = the shortest training window among the models (an export's run_config.data.seq_len;
    positions beyond it were never trained, so scoring there measures length extrapolation, not
    augmentation), 0 = only the models' positions bound the sites."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1 or self.sites_per_row < 1 or self.min_context < 1:
            raise PipelineError("k, batch_size, sites_per_row and min_context must be >= 1")
        if self.n_resamples < 1 or not 0.0 < self.level < 1.0:
            raise PipelineError("n_resamples must be >= 1 (e.g. --bootstrap 1000) and level in (0, 1)")
        if self.window is not None and self.window < 0:
            raise PipelineError("window must be >= 0 (0 = no bound beyond the models' positions)")
        if self.sites_per_doc is not None and self.sites_per_doc < 1:
            raise PipelineError("sites_per_doc must be >= 1 (or None for every position)")


@dataclasses.dataclass
class SitePlan:
    """The evaluated sites: document index and position of each, in a fixed order."""

    doc: np.ndarray  # (N,)
    site: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.site)


# ---------------------------------------------------------------------- data
def load_documents(data_dir: str | Path, *, split: str = "validation", limit: int | None = None
                   ) -> list[np.ndarray]:
    """Token arrays of the documents of a data-prep output dir (each ends with EOS)."""
    from pipeline.data.shards import load_manifest, open_shard

    manifest = load_manifest(data_dir)
    prefixes = manifest.prefixes(split)
    if not prefixes:
        raise PipelineError(f"{data_dir}: no {split} shards (build with --val-fraction > 0)")
    docs: list[np.ndarray] = []
    for prefix in prefixes:
        ds = open_shard(prefix)
        for i in range(len(ds)):
            if limit is not None and len(docs) >= limit:
                return docs
            docs.append(np.array(ds[i], dtype=np.int64))  # a copy: the memmap closes with ds
    return docs


def plan_sites(docs: list[np.ndarray], cfg: PplConfig, last_site: int) -> SitePlan:
    """Seeded sites per document: p in [min_context-1, min(len-1-K, last_site)]."""
    rng = np.random.default_rng(cfg.seed)
    doc_idx, sites = [], []
    for i, d in enumerate(docs):
        lo, hi = cfg.min_context - 1, min(len(d) - 1 - cfg.k, last_site)
        if hi < lo:
            continue
        allowed = np.arange(lo, hi + 1)
        if cfg.sites_per_doc is not None and cfg.sites_per_doc < len(allowed):
            allowed = np.sort(rng.choice(allowed, cfg.sites_per_doc, replace=False))
        doc_idx.append(np.full(len(allowed), i))
        sites.append(allowed)
    if not sites:
        raise PipelineError(f"no document is long enough for K={cfg.k} tokens after a site "
                            f"(need > {cfg.min_context + cfg.k} tokens); lower --k")
    return SitePlan(np.concatenate(doc_idx), np.concatenate(sites))


# ---------------------------------------------------------------------- scoring
def _rows(plan: SitePlan, per_row: int) -> list[np.ndarray]:
    """Indices into the plan, grouped into rows: consecutive sites of one document."""
    rows = []
    start = 0
    n = len(plan)
    while start < n:
        end = start
        while end < n and end - start < per_row and plan.doc[end] == plan.doc[start]:
            end += 1
        rows.append(np.arange(start, end))
        start = end
    return rows


def score_plan(model: EvalModel, docs: list[np.ndarray], plan: SitePlan, cfg: PplConfig, *,
               augment: bool, pad_id: int = 0, progress: Callable[[int, int], None] | None = None
               ) -> np.ndarray:
    """NLL `(N, K)` of the k-th token after each planned site.

    `progress(done, total)` is called after each batch with the number of sites scored.
    """
    k = cfg.k
    order = np.argsort(plan.doc, kind="stable")
    if not np.array_equal(order, np.arange(len(plan))):
        raise PipelineError("site plan must be grouped by document")
    rows = _rows(plan, cfg.sites_per_row)
    rows.sort(key=lambda r: -int(plan.site[r[-1]]))  # similar lengths together, longest first
    out = np.zeros((len(plan), k), dtype=np.float32)
    done = 0
    for b in range(0, len(rows), cfg.batch_size):
        batch = rows[b : b + cfg.batch_size]
        seq = max(int(plan.site[r[-1]]) + k + 1 for r in batch)
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
        sites = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            d = docs[int(plan.doc[r[0]])]
            n = int(plan.site[r[-1]]) + k + 1
            ids[j, :n] = torch.from_numpy(d[:n])
            s = torch.from_numpy(plan.site[r].astype(np.int64))
            sites[j, : len(r)] = s
            sites[j, len(r):] = s[-1]  # padding sites repeat the last one (kept sorted)
        nll = model.score_sites(ids, sites, k, augment=augment).cpu().numpy()
        for j, r in enumerate(batch):
            out[r] = nll[j, : len(r)]
        done += sum(len(r) for r in batch)
        if progress is not None:
            progress(done, len(plan))
    return out


# ---------------------------------------------------------------------- results
def ppl_per_k(nll: np.ndarray) -> list[float]:
    """exp(mean over sites) for each k, from NLL `(N, K)`."""
    return [float(math.exp(x)) for x in nll.astype(np.float64).mean(axis=0)]


def bootstrap_settings(cfg: PplConfig) -> dict[str, Any]:
    """The `bootstrap` entry of the results: how the intervals were drawn."""
    return {"n_resamples": cfg.n_resamples, "level": cfg.level, "seed": cfg.bootstrap_seed}


def _pairs(ci: np.ndarray) -> list[list[float]]:
    return [[float(lo), float(hi)] for lo, hi in ci]


def summarize(model: EvalModel, nll: np.ndarray, nll_base: np.ndarray, cfg: PplConfig | None = None
              ) -> dict[str, Any]:
    """One model's entry of the results: per-k lists, and per-k `[low, high]` intervals.

    `<key>_ci` is the interval of `<key>`. A model that augments gets `ppl_ci`, `ppl_base_ci`,
    `reduction_pct_ci`, `delta_nll` (mean NLL augmented − Base) and `delta_nll_ci`, all on the
    same resampled sites; a plain model only `ppl_ci`.
    """
    cfg = cfg or PplConfig()
    ppl, base = ppl_per_k(nll), ppl_per_k(nll_base)
    boot = paired_ppl_bootstrap(nll, nll_base if model.augments else None, n_resamples=cfg.n_resamples,
                                level=cfg.level, seed=cfg.bootstrap_seed)
    out = {
        **model.describe(),
        "augments": model.augments,
        "n_sites": int(nll.shape[0]),
        "ppl": ppl,
        "ppl_base": base,
        "reduction_pct": [100.0 * (b - a) / b for a, b in zip(ppl, base, strict=True)],
        "ppl_ci": _pairs(boot.ppl_ci),
    }
    if model.augments:
        out |= {"ppl_base_ci": _pairs(boot.base_ppl_ci), "reduction_pct_ci": _pairs(boot.reduction_pct_ci),
                "delta_nll": [float(x) for x in boot.delta_nll], "delta_nll_ci": _pairs(boot.delta_nll_ci)}
    return out


def table_positions(k: int, extra: Iterable[int] = ()) -> list[int]:
    """Rows of the markdown table: 1, 2, 4, ... up to K, K itself, and each N_A."""
    pos = {1 << i for i in range(k.bit_length()) if 1 << i <= k} | {k}
    pos |= {x for x in extra if 1 <= x <= k}
    return sorted(pos)


def _with_ci(value: float, m: dict[str, Any], key: str, i: int, fmt: str) -> str:
    """`value [low, high]` when the model has `<key>_ci` (older results have none)."""
    ci = m.get(f"{key}_ci")
    if ci is None:
        return format(value, fmt)
    return f"{value:{fmt}} [{ci[i][0]:{fmt}}, {ci[i][1]:{fmt}}]"


def markdown_table(results: dict[str, Any]) -> str:
    """ppl, Base ppl and Δ% (the reduction) per model at `table_positions`, with intervals."""
    models = results["models"]
    k = results["k"]
    rows = table_positions(k, [m["n_ahead"] for m in models])
    head = ["position"]
    for m in models:
        head += [f"{m['name']} ppl", f"{m['name']} base", f"{m['name']} Δ%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pos in rows:
        cells = [str(pos)]
        for m in models:
            i = pos - 1
            cells += [_with_ci(m["ppl"][i], m, "ppl", i, ".3f"), _with_ci(m["ppl_base"][i], m, "ppl_base", i, ".3f"),
                      _with_ci(m["reduction_pct"][i], m, "reduction_pct", i, "+.2f")]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("window"):
        lines += ["", f"Sites: every context and its {k} scored tokens lie inside the first {results['window']} "
                  "tokens of a held-out document (the window the models trained on)."]
    boot = results.get("bootstrap")
    if boot is not None:
        lines += ["", f"[low, high]: {100 * boot['level']:g}% percentile bootstrap over the {results['n_sites']} "
                  f"sites ({boot['n_resamples']} resamples, seed {boot['seed']}; Base and augmented on the same "
                  "resamples; sites of one document are correlated, so the intervals are somewhat optimistic)."]
    return "\n".join(lines) + "\n"


def dump_lines(docs: list[np.ndarray], plan: SitePlan, k: int, nll: np.ndarray,
               nll_base: np.ndarray | None, model_name: str | None = None) -> Iterable[str]:
    """DESIGN.md "Per-site dump": one JSON object per site (context, targets, nll, ...)."""
    for i in range(len(plan)):
        d, p = docs[int(plan.doc[i])], int(plan.site[i])
        line: dict[str, Any] = {
            "context": d[: p + 1].tolist(),
            "targets": d[p + 1 : p + 1 + k].tolist(),
            "nll": [float(x) for x in nll[i]],
        }
        if nll_base is not None:
            line["nll_base"] = [float(x) for x in nll_base[i]]
        if model_name is not None:
            line["model"] = model_name
        line["doc"], line["site"] = int(plan.doc[i]), p
        yield json.dumps(line)
