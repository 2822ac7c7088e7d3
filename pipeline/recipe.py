"""The built-in default recipe: the main job of a fresh machine, nothing downloaded.

    deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero2_cpu.json

1. data: a small sentencepiece tokenizer and shards from `builtin:pydocs` (the
   documentation bundled with Python), unless already there;
2. Base: pretrain the tiny GPT-2 on it (`continued_pretraining` from random init,
   since a dual variant on a random Base means nothing);
3. dual: train the default variant (`liu`) on top of that Base;
4. evaluation: ppl of the k-th token after augmentation vs the Base alone on the
   held-out shards, printed whichever way it goes.

Each stage is resumable (`--resume auto` semantics) and reuses finished work. It sits
above the stages (data -> train -> eval), so `pipeline/train` never imports `eval`.
It logs and returns; the launcher prints the result and shows progress.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.data.build import BuildOptions, build
from pipeline.data.readers import Reader, resolve_inputs
from pipeline.data.shards import MANIFEST
from pipeline.data.tokenizer import train_sentencepiece
from pipeline.eval.ppl import PplConfig, markdown_table
from pipeline.eval.runner import load_models, run_ppl_at_k
from pipeline.train.config import load_config
from pipeline.train.dual_task import DualPretraining
from pipeline.train.tracking import log_artifacts_to_run
from pipeline.train.trainer import StepCallback, train

log = logging.getLogger(__name__)

BASE_STEPS = 2000
DUAL_STEPS = 600
TINY_LR = 1e-3
"""A 0.4M-parameter model learns faster than the ds_configs' 3e-4 (meant for real sizes) allows."""
VOCAB = 4000


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
class RecipeResult:
    export: Path
    """The liu export directory."""
    table: str | None
    """ppl-at-k of the export against its Base alone (markdown; rank 0 only)."""
    n_sites: int = 0


def run_default(ds_config: dict[str, Any], root: str | Path = "runs/default", overrides: list[str] = (),
                progress: Callable[[str, int], StepCallback | None] | None = None) -> RecipeResult:
    """The main job. `progress(stage, max_steps)` may return a per-step callback for a stage."""
    import deepspeed
    import deepspeed.comm as dist
    import torch

    root = Path(root)
    ds_config = copy.deepcopy(ds_config)
    ds_config.get("optimizer", {}).get("params", {})["lr"] = TINY_LR
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() == 0:
        prepare_data(root)
    dist.barrier()
    data = (root / "data").resolve()
    # One MLflow store for the recipe's stages, unless the user points elsewhere.
    tracking = [] if os.environ.get("MLFLOW_TRACKING_URI") else [f"tracking.tracking_uri=sqlite:///{root.resolve()}/mlflow.db"]
    overrides = [*tracking, *overrides]

    base_cfg = load_config("tiny-continued_pretraining", [
        f"data.path={data}", f"train.output_dir={root / 'base'}", f"train.max_steps={BASE_STEPS}",
        "train.eval_every=500", "tracking.run_name=default-base", *overrides])
    base = root / "base" / "export"
    if not (base / "pipeline.json").is_file():
        log.info("stage 1/3: pretraining the tiny Base on builtin:pydocs")
        base = train(DualPretraining(base_cfg), ds_config, resume="auto",
                     on_step=progress and progress("base", BASE_STEPS)).export_dir
    dual_cfg = load_config("tiny-liu", [
        f"data.path={data}", f"model.path={base.resolve()}", f"train.output_dir={root / 'liu'}",
        f"train.max_steps={DUAL_STEPS}", "train.eval_every=200", "tracking.run_name=default-liu",
        # The frozen Base then predicts every target from a real token that attends to the
        # latents (it starts from its own predictions, not from a raw latent); pipeline.json records it.
        "dual.decode_reread=true", *overrides])
    export, tracking = root / "liu" / "export", None
    if not (export / "pipeline.json").is_file():
        log.info("stage 2/3: training the liu Coprocessor on the frozen Base")
        result = train(DualPretraining(dual_cfg), ds_config, resume="auto",
                       on_step=progress and progress("liu", DUAL_STEPS))
        export, tracking = result.export_dir, result.tracking
    result = RecipeResult(export=export, table=None)
    if dist.get_rank() == 0:
        log.info("stage 3/3: evaluating ppl of the k-th token after augmentation")
        result.table, result.n_sites = summarize(export, root / "eval")
        if tracking:
            log_artifacts_to_run(*tracking, sorted((root / "eval").glob("ppl_at_k.*")))
    dist.barrier()
    return result


def summarize(export: Path, out: Path) -> tuple[str, int]:
    """ppl-at-k of the dual export against its Base alone, on the held-out shards:
    (markdown table, number of sites)."""
    results = run_ppl_at_k(load_models([str(export)], device="cpu"), out=out,
                           cfg=PplConfig(k=8, sites_per_doc=8, seed=0))
    return markdown_table(results), results["n_sites"]
