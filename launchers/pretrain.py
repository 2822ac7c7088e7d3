"""Train one variant with DeepSpeed; with no --config, the built-in default recipe.

    deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero2_cpu.json
    deepspeed launchers/pretrain.py --ds_config ds_configs/zero2.json --config tiny-h1 \\
        data.path=runs/data train.max_steps=500 [--resume auto|PATH] [--dry-run]

--config takes a preset name (pipeline/presets/*.yaml) or a YAML path; trailing
`dotted.key=value` arguments override it (unknown keys are errors). Its `task:` key says
what trains: dual pretraining by default, `reasoning_sft` for the reason-* presets. DeepSpeed's
config owns batch size, optimizer, scheduler, precision and ZeRO stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.logs import announce_op_builds, setup_logging  # noqa: E402
from pipeline.progress import Progress  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON config (ds_configs/*.json)")
    ap.add_argument("--config", help="preset name or YAML file; omit for the built-in default recipe")
    ap.add_argument("--resume", help="'auto' (the newest complete checkpoint in train.output_dir, if any) or a checkpoint path")
    ap.add_argument("--recipe", default="default", choices=["default", "compare"],
                    help="without --config: the main job (default) or every variant from one Base (compare)")
    ap.add_argument("--recipe-root", default="runs/default", help="where the recipes (no --config) work")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved configs and stop")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the pipeline config")
    return ap


def _progress(desc: str, total: int):
    """A progress bar (TTY) or periodic lines for one training stage, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    bar = Progress(total, desc)

    def on_step(step: int, metrics: dict) -> None:
        bar.update(step, loss=metrics.get("loss"), val_loss=metrics.get("val_loss"))
        if step >= total:
            bar.close()
    return on_step


def _single_process_env() -> None:
    """`python launchers/pretrain.py ...` (no `deepspeed` launcher): one rank on this machine,
    instead of DeepSpeed falling back to MPI discovery and failing on a missing mpi4py."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        from pipeline.train.testing import free_port

        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        ds_config = json.loads(Path(args.ds_config).read_text())
        if args.config is None:
            from pipeline.train.config import load_config

            load_config("tiny-liu", args.overrides)  # the recipe's overrides, checked before any start
            if args.dry_run:
                print(f"{args.recipe} recipe: builtin:pydocs -> small Base -> " +
                      ("liu -> ppl-at-k summary" if args.recipe == "default" else "every variant -> comparison table"))
                return 0
            from pipeline.recipe import RUNNERS

            _single_process_env()
            announce_op_builds(logging.getLogger("pretrain"))
            result = RUNNERS[args.recipe](ds_config, root=args.recipe_root, overrides=args.overrides,
                                          progress=_progress)
            if rank0 and result.table:
                print(f"\n{result.title} ({result.n_sites} held-out sites):\n{result.table}")
            return 0
        task = _checked_task(args.config, args.overrides, ds_config)
        cfg = task.config
        if args.dry_run:
            print(json.dumps({"task": task.kind, "pipeline": task.config_dict(), "deepspeed": ds_config}, indent=2))
            return 0
        from pipeline.train.trainer import train

        _single_process_env()
        announce_op_builds(logging.getLogger("pretrain"))
        label = cfg.dual.variant if hasattr(cfg, "dual") else task.kind
        result = train(task, ds_config, resume=args.resume, on_step=_progress(label, cfg.train.max_steps))
        if rank0:
            print(f"step {result.step}/{cfg.train.max_steps}" + (f", val loss {result.val_loss:.4f}" if result.finished else
                  " (stopped early; continue with --resume auto)") +
                  (f", exported to {result.export_dir}" if result.export_dir else ""))
        return 0
    except (PipelineError, OSError, json.JSONDecodeError) as exc:
        for line in str(exc).splitlines():  # a config lists every problem, one per line
            print(f"error: {line}", file=sys.stderr)
        return 2


def _checked_task(config: str, overrides: list[str], ds_config: dict):
    """The preset's task (its `task:` key; default dual pretraining), with the pipeline config
    and the DeepSpeed config's batch arithmetic (for the world the launcher set up, 1 rank
    without one) both checked before any process group starts: every problem in one error."""
    import torch

    from pipeline.config import check
    from pipeline.train.configs import load_task
    from pipeline.train.trainer import resolve_ds_config

    problems, task = [], None
    try:
        task = load_task(config, overrides)
    except PipelineError as exc:
        problems.append(str(exc))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_ds_config(ds_config, task.config.train.max_steps if task else 1,
                          int(os.environ.get("WORLD_SIZE", 1)), device, warn=False)
    except PipelineError as exc:
        problems.append(f"DeepSpeed config: {exc}")
    check(problems)
    return task


if __name__ == "__main__":
    sys.exit(main())
