"""The built-in recipes: the main job of a fresh machine (nothing downloaded), and the comparison.

    deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero2_cpu.json
    deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero2_cpu.json --recipe compare

`default`:
1. data: a small sentencepiece tokenizer and shards from `builtin:pydocs` (the
   documentation bundled with Python), unless already there;
2. Base: pretrain a small GPT-2 on it (`continued_pretraining` from random init,
   since a dual variant on a random Base means nothing);
3. dual: train the default variant (`liu`) on top of that Base;
4. evaluation: ppl of the k-th token after augmentation vs the Base alone on the
   held-out shards, with bootstrap intervals, printed whichever way it goes.

`compare` (paper 000 §4.1): from the same Base, every variant at the same N_L, step
count, batch and learning rates (the Base's own parameters at COMPARE_BASE_LR_SCALE of the
lr) — `continued_pretraining` is the data-matched baseline (the same training tokens as
each dual run) — then ppl at k on the same held-out sites, a
table in the shape of paper 000 Table 1 / Fig. 2 (Δ against continued
pretraining, paired bootstrap intervals) and every variant's validation curve;
one MLflow parent run with a child run per stage.

Each stage is resumable (`--resume auto` semantics) and reuses finished work. This
module sits above the stages (data -> train -> eval), so `pipeline/train` never
imports `eval`. It logs and returns; the launcher prints the result and shows progress.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import flatten, to_dict
from pipeline.data.build import BuildOptions, build
from pipeline.data.readers import Reader, resolve_inputs
from pipeline.data.shards import MANIFEST
from pipeline.data.tokenizer import train_sentencepiece
from pipeline.dual.variants import get_variant
from pipeline.errors import PipelineError
from pipeline.eval.bootstrap import paired_ppl_bootstrap
from pipeline.eval.ppl import PplConfig, markdown_table
from pipeline.eval.runner import load_models, run_ppl_at_k
from pipeline.train.checkpoint import CONFIG_FILE
from pipeline.train.config import load_config
from pipeline.train.dual_task import DualPretraining
from pipeline.train.tracking import finish_run, log_artifacts_to_run, plot_curves, start_parent_run
from pipeline.train.trainer import StepCallback, train

log = logging.getLogger(__name__)

BASE_STEPS = 2000
DUAL_STEPS = 600
TINY_LR = 1e-3
"""A 0.4M-parameter model learns faster than the ds_configs' 3e-4 (meant for real sizes) allows."""
VOCAB = 4000
EVAL = PplConfig(k=8, sites_per_doc=None, seed=0)
"""Every allowed position of every held-out document is a site (~3,000 here), so the
intervals are as tight as this small validation split allows."""
DEFAULT_READING = """
Δ% > 0: the latents lower ppl. The paper's liu on this 0.4M-parameter frozen Base, 600 steps,
is measured to change little (README, "Why the tiny main job shows no latent effect"). The
setting in which this Base measurably reads its Coprocessor (k = 1-3, ~14 min on 2 CPU cores):
  deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero2_cpu_tiny.json \\
      --config tiny-liu-draft data.path={root}/data model.path={root}/base/export
"""
COMPARE_VARIANTS = ("continued_pretraining", "soft_embedding", "pause", "liu", "h1", "h2")
COMPARE_BASE_LR_SCALE = 0.1
"""`train.base_lr_scale` of the comparison's stages: a variant that trains the Base
(continued_pretraining, soft_embedding, h2) continues it at 0.1 x TINY_LR, the lr its
pretraining ended at (WarmupCosineLR, cos_min_ratio 0.1), while what a variant adds trains
at TINY_LR. Re-warming the Base to the peak first damaged it (issue 13: h2 and
soft_embedding ended worse than the Base they started from)."""
RECIPES = ("default", "compare")
Progress = Callable[[str, int], StepCallback | None]


@dataclasses.dataclass
class RecipeResult:
    export: Path
    """The liu export directory (default) or the comparison's directory (compare)."""
    table: str | None
    """The result table (markdown; rank 0 only)."""
    n_sites: int = 0
    title: str = ""


def prepare_data(root: Path) -> Path:
    """Tokenizer + shards from builtin:pydocs under `root` (reused when complete)."""
    data, tok = root / "data", root / "tokenizer" / "spm"
    if (data / MANIFEST).is_file():
        return data
    if not Path(f"{tok}.model").is_file():
        tok.parent.mkdir(parents=True, exist_ok=True)
        reader = Reader(resolve_inputs(["builtin:pydocs"]), "text", "skip", "file")
        train_sentencepiece((text for text, _, _ in reader), tok, vocab_size=VOCAB, seed=0)
    build(BuildOptions(inputs=["builtin:pydocs"], tokenizer=f"{tok}.model", output=str(data), val_fraction=0.05))
    return data


@dataclasses.dataclass
class _Setup:
    root: Path
    data: Path
    ds_config: dict[str, Any]
    overrides: list[str]
    tracking_uri: str
    rank: int


def _setup(ds_config: dict[str, Any], root: str | Path, overrides: list[str], data: str | None = None) -> _Setup:
    import deepspeed
    import deepspeed.comm as dist
    import torch

    root = Path(root)
    ds_config = copy.deepcopy(ds_config)
    ds_config.get("optimizer", {}).get("params", {})["lr"] = TINY_LR
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if data is None and dist.get_rank() == 0:
        prepare_data(root)
    dist.barrier()
    data = Path(data) if data else root / "data"
    # One MLflow store for the recipe's stages, unless the user points elsewhere.
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"
    tracking = [] if os.environ.get("MLFLOW_TRACKING_URI") else [f"tracking.tracking_uri={uri}"]
    return _Setup(root, data.resolve(), ds_config, [*tracking, *overrides], uri, dist.get_rank())


def _stage(s: _Setup, preset: str, out: Path, steps: int, progress: Progress | None, name: str,
           *extra: str) -> tuple[Path, tuple[str, str] | None]:
    """Train one stage unless its export exists: (export dir, (tracking uri, run id) or None)."""
    export = out / "export"
    cfg = load_config(preset, [f"data.path={s.data}", f"train.output_dir={out}", f"train.max_steps={steps}",
                               f"tracking.run_name={name}", *extra, *s.overrides])
    if (export / "pipeline.json").is_file():
        changed = config_changes(out / CONFIG_FILE, cfg)
        if changed:
            raise PipelineError(f"{out} was trained with a different config ({'; '.join(changed)}); delete that "
                                f"directory to train this stage again")
        log.info("%s: reusing %s", name, export)
        return export, None
    log.info("%s: training %s for %d steps on %s", name, cfg.dual.variant, steps, s.data)
    result = train(DualPretraining(cfg), s.ds_config, resume="auto", on_step=progress and progress(name, steps))
    return result.export_dir, result.tracking


def config_changes(recorded: Path, cfg: Any) -> list[str]:
    """How `cfg` differs from the config a finished stage recorded, as "key: old -> new"
    (tracking and train.output_dir aside: the directory is the stage's identity, and may
    have moved); a key the record lacks counts at its default (a newer option)."""
    if not recorded.is_file():
        return []
    defaults = flatten(to_dict(type(cfg)()))
    old, new = flatten(json.loads(recorded.read_text())), flatten(to_dict(cfg))
    return [f"{key}: {old.get(key, defaults.get(key))!r} -> {value!r}" for key, value in new.items()
            if not key.startswith("tracking.") and key != "train.output_dir"
            and old.get(key, defaults.get(key)) != value]


def _base(s: _Setup, progress: Progress | None, steps: int = BASE_STEPS) -> Path:
    return _stage(s, "tiny-continued_pretraining", s.root / "base", steps, progress, "base",
                  "train.eval_every=500")[0].resolve()


def _variant_overrides(variant: str, base: Path) -> list[str]:
    """What every dual stage of the recipes shares: the Base, and `decode_reread` for the
    embedding variants, so that every target is predicted from a real token that attends to
    the latents (h1 always re-reads; the frozen-Base variants start from the Base's own
    predictions, not from a raw latent). pipeline.json records it."""
    extra = [f"model.path={base}"]
    if variant not in ("continued_pretraining", "h1"):
        extra.append("dual.decode_reread=true")
    return extra


def run_default(ds_config: dict[str, Any], root: str | Path = "runs/default", overrides: list[str] = (),
                progress: Progress | None = None) -> RecipeResult:
    """The main job. `progress(stage, max_steps)` may return a per-step callback for a stage."""
    import deepspeed.comm as dist

    s = _setup(ds_config, root, list(overrides))
    base = _base(s, progress)
    export, tracking = _stage(s, "tiny-liu", s.root / "liu", DUAL_STEPS, progress, "liu",
                              "train.eval_every=200", *_variant_overrides("liu", base))
    result = RecipeResult(export=export, table=None, title="ppl of the k-th token after augmentation")
    if s.rank == 0:
        log.info("evaluating ppl of the k-th token after augmentation")
        result.table, result.n_sites = summarize(export, s.root / "eval")
        result.table = result.table.rstrip("\n") + "\n" + DEFAULT_READING.format(root=s.root)
        if tracking:
            log_artifacts_to_run(*tracking, sorted((s.root / "eval").glob("ppl_at_k.*")))
    dist.barrier()
    return result


def summarize(export: Path, out: Path) -> tuple[str, int]:
    """ppl-at-k of the dual export against its Base alone, on the held-out shards:
    (markdown table, number of sites)."""
    results = run_ppl_at_k(load_models([str(export)], device="cpu"), out=out, cfg=EVAL)
    return markdown_table(results), results["n_sites"]


# ---------------------------------------------------------------------- the comparison
def run_compare(ds_config: dict[str, Any], root: str | Path = "runs/default", overrides: list[str] = (),
                progress: Progress | None = None, *, variants: tuple[str, ...] = COMPARE_VARIANTS,
                steps: int = DUAL_STEPS, base_steps: int = BASE_STEPS, data: str | None = None) -> RecipeResult:
    """Every variant from one Base at the same budget; the table of paper 000 Table 1 / Fig. 2.
    `data` (a data-prep directory) replaces the built-in corpus; the default root shares the
    main job's data and Base."""
    import deepspeed.comm as dist

    s = _setup(ds_config, root, list(overrides), data)
    out = s.root / "compare"
    base = _base(s, progress, base_steps)
    parent = [None]
    if s.rank == 0 and load_config("tiny-liu", s.overrides).tracking.enabled:
        parent[0] = start_parent_run(s.tracking_uri, "latent-pipeline", "compare",
                                     {"variants": ",".join(variants), "steps": steps, "base": str(base)})
    dist.broadcast_object_list(parent, src=0)
    link = [f"tracking.parent_run_id={parent[0]}"] if parent[0] else []
    exports = {}
    for variant in variants:
        scale = [f"train.base_lr_scale={COMPARE_BASE_LR_SCALE}"] if get_variant(variant).train_base else []
        exports[variant] = _stage(s, f"tiny-{variant}", out / variant, steps, progress, f"compare-{variant}",
                                  "train.eval_every=100", *scale, *link, *_variant_overrides(variant, base))[0]
    result = RecipeResult(export=out, table=None, title=f"variants from one Base, {steps} steps each")
    if s.rank == 0:
        log.info("compare: evaluating every variant on the same held-out sites")
        models = load_models([str(exports[v]) for v in variants], device="cpu")
        for model, variant in zip(models, variants, strict=True):
            model.name = variant
        ppl = run_ppl_at_k(models, out=out / "eval", cfg=EVAL, dump=str(out / "eval" / "sites.jsonl"))
        nll = site_nll(out / "eval" / "sites.jsonl")
        rows = compare_rows(ppl, nll, {v: out / v for v in variants})
        n_ahead = min((m["n_ahead"] for m in ppl["models"] if m["augments"]), default=COMPARE_K[-1])
        checks = check_orderings(nll, n_ahead)
        result.table = compare_table(rows, ppl) + ("\n" + orderings_table(checks, n_ahead) if checks else "")
        result.n_sites = ppl["n_sites"]
        (out / "compare.md").write_text(result.table)
        (out / "compare.json").write_text(json.dumps(rows, indent=2))
        (out / "orderings.json").write_text(json.dumps(checks, indent=2))
        plot_validation(rows, out / "validation_ppl.png")
        finish_run(s.tracking_uri, parent[0], {f"ppl_k1/{r['variant']}": r["ppl"][0] for r in rows},
                   [out / "compare.md", out / "compare.json", out / "orderings.json", out / "validation_ppl.png"])
    dist.barrier()
    return result


COMPARE_K = (1, 2, 4, 8)
REFERENCE = "continued_pretraining"


PAPER_ORDERINGS = (
    # (a, b, sign of ppl(a) - ppl(b) in the paper, the paper's words): paper 000 §4.1, GPT-2 124M
    ("liu", "continued_pretraining", +1, "Liu's dual model above data-matched continued pretraining (≈ +1.5 ppl)"),
    ("h1", "continued_pretraining", -1, "Hyp. 1 below continued pretraining (≈ 2 ppl lower)"),
    ("h2", "continued_pretraining", -1, "Hyp. 2 below continued pretraining (≈ 2 ppl lower)"),
    ("h1", "soft_embedding", +1, "Hyp. 1 above the soft-embedding baseline"),
    ("h2", "soft_embedding", -1, "Hyp. 2 below soft embeddings, only marginally"),
)


def site_nll(dump: Path) -> dict[str, np.ndarray]:
    """Per model, the per-site NLLs `(sites, K)` of a ppl-at-k dump (same site order for all)."""
    nll: dict[str, list] = {}
    for line in dump.read_text().splitlines():
        row = json.loads(line)
        nll.setdefault(row["model"], []).append(row["nll"])
    return {k: np.asarray(v, dtype=np.float64) for k, v in nll.items()}


def check_orderings(nll: dict[str, np.ndarray], n_ahead: int) -> list[dict[str, Any]]:
    """Each of paper 000's pretraining orderings on the same held-out sites.

    The measure is ppl over the first `n_ahead` tokens after each site (what the dual variants
    train on; continued pretraining's own next-token predictions there), the paired difference
    ppl(a) - ppl(b) with a 95% percentile bootstrap over sites, and a verdict: `holds` (the
    interval lies on the paper's side of 0), `reversed` (on the other side) or `unresolved`.
    """
    out = []
    for a, b, sign, claim in PAPER_ORDERINGS:
        if a not in nll or b not in nll:
            continue
        boot = paired_ppl_bootstrap(nll[a][:, :n_ahead].mean(1, keepdims=True),
                                    nll[b][:, :n_ahead].mean(1, keepdims=True), seed=0)
        lo, hi = (float(v) for v in boot.ppl_gap_ci[0])
        verdict = "holds" if sign * lo > 0 and sign * hi > 0 else "reversed" if sign * lo < 0 and sign * hi < 0 \
            else "unresolved"
        out.append({"a": a, "b": b, "paper": claim, "paper_sign": sign, "ppl_a": float(boot.ppl[0]),
                    "ppl_b": float(boot.base_ppl[0]), "gap": float(boot.ppl_gap[0]), "gap_ci": [lo, hi],
                    "verdict": verdict})
    return out


def orderings_table(checks: list[dict[str, Any]], n_ahead: int) -> str:
    lines = [f"Paper 000's orderings (§4.1, GPT-2), checked on ppl over the first {n_ahead} tokens after each "
             "site, same sites for every variant:", "",
             "| paper's finding | a | b | ppl a | ppl b | a − b [95% paired bootstrap] | here |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        lo, hi = c["gap_ci"]
        lines.append(f"| {c['paper']} | {c['a']} | {c['b']} | {c['ppl_a']:.2f} | {c['ppl_b']:.2f} | "
                     f"{c['gap']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {c['verdict']} |")
    lines += ["", "holds: the interval lies on the paper's side of 0; reversed: on the other side; unresolved: "
              "it contains 0."]
    return "\n".join(lines) + "\n"


def compare_rows(ppl: dict[str, Any], nll: dict[str, np.ndarray], runs: dict[str, Path]) -> list[dict[str, Any]]:
    """Per variant: its validation curve (own objective), ppl at k with intervals, and the
    paired Δ ppl against continued pretraining on the same sites `nll` (bootstrap over sites)."""
    ref = nll.get(REFERENCE)
    rows = []
    for m in ppl["models"]:
        name = m["name"]
        curve = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        val = [(c["step"], c["val_loss"]) for c in curve if "val_loss" in c]
        row = {"variant": name, "val_curve": val, "val_ppl": math.exp(val[-1][1]) if val else None,
               "ppl": [m["ppl"][k - 1] for k in COMPARE_K],
               "ppl_ci": [m["ppl_ci"][k - 1] for k in COMPARE_K] if "ppl_ci" in m else None}
        if ref is not None and name != REFERENCE:
            cols = [k - 1 for k in COMPARE_K]
            paired = paired_ppl_bootstrap(nll[name][:, cols], ref[:, cols], seed=0)
            row |= {"delta_vs_cp": paired.ppl_gap.tolist(), "delta_vs_cp_ci": paired.ppl_gap_ci.tolist()}
        rows.append(row)
    return rows


def compare_table(rows: list[dict[str, Any]], ppl: dict[str, Any]) -> str:
    head = ["variant", "val ppl (own objective)"] + [f"ppl k={k}" for k in COMPARE_K] + \
           [f"Δ vs CP k={k}" for k in COMPARE_K]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['val_ppl']:.2f}" if r["val_ppl"] else "-"]
        for i, value in enumerate(r["ppl"]):
            ci = r["ppl_ci"][i] if r["ppl_ci"] else None
            cells.append(f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        for i in range(len(COMPARE_K)):
            if "delta_vs_cp" in r:
                lo, hi = r["delta_vs_cp_ci"][i]
                cells.append(f"{r['delta_vs_cp'][i]:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            else:
                cells.append("0")
        lines.append("| " + " | ".join(cells) + " |")
    window = f" (context and scored tokens inside the first {ppl['window']} tokens of a document, the window the " \
             "models trained on)" if ppl.get("window") else ""
    lines += ["", f"ppl at k: the k-th token after a site, on the same {ppl['n_sites']} held-out sites{window} for every "
              "variant (continued pretraining: its own next-token prediction there). Δ vs CP: ppl minus "
              "continued pretraining's, [95% paired percentile bootstrap over sites]. val ppl is each run's own "
              "validation objective (ahead tokens for dual variants, every token for continued pretraining), "
              "so it compares curves' shapes, not levels across kinds."]
    return "\n".join(lines) + "\n"


def plot_validation(rows: list[dict[str, Any]], png: Path) -> Path:
    """Every variant's validation ppl against training step (paper 000 Fig. 2)."""
    curves = {r["variant"]: [(step, math.exp(v)) for step, v in r["val_curve"]] for r in rows}
    return plot_curves(curves, png, ylabel="validation ppl (own objective)")


RUNNERS = {"default": run_default, "compare": run_compare}
