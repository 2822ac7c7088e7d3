"""DeepSpeed checkpoint (any ZeRO stage) -> the export directory of DESIGN.md §3.

    python launchers/export.py runs/tiny-liu/checkpoints/step50 runs/tiny-liu/export2
    python launchers/export.py runs/tiny-liu/checkpoints runs/tiny-liu/export2   # the latest tag

The output holds pipeline.json, base/ and coprocessor/ (Hugging Face directories
that transformers loads, LoRA merged) and latents.safetensors. continued_pretraining
has no augmentation: its base/ is the plain Hugging Face model, with pipeline.json
(run config, data path, tokenizer) in the export root beside it, not inside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import PipelineError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint tag directory, or a checkpoints directory (uses 'latest')")
    ap.add_argument("output", help="export directory to create")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a previous export there (a directory holding anything else is always refused)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        from pipeline.train.checkpoint import resolve
        from pipeline.train.export import export_checkpoint

        tag_dir = resolve(args.checkpoint)  # a checkpoints directory stands for its `latest` tag
        out = export_checkpoint(tag_dir, args.output, overwrite=args.overwrite)
        print(f"exported {tag_dir} -> {out}")
        return 0
    except (PipelineError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
