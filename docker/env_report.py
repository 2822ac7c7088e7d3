#!/usr/bin/env python3
"""Print what this container has: versions, DeepSpeed's prebuilt ops, visible GPUs.

The container entrypoint prints it at start (so every job log says what it ran on);
the image build and the healthcheck use it to fail loudly on a wrong install:

  env_report.py --expect torch==2.13.0 --expect megatron-core==0.16.1 --require-op fused_adam

DeepSpeed is not imported (that takes seconds and picks an accelerator); its record of
which ops `pip install` compiled is read from its installed-info file instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import importlib.util
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "megatron-core", "triton", "transformers", "mlflow", "apex")


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def deepspeed_installed_ops() -> dict[str, bool]:
    """Ops compiled into the DeepSpeed install (the rest JIT-compile on first use)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return {}
    info = Path(next(iter(spec.submodule_search_locations))) / "git_version_info_installed.py"
    if not info.is_file():
        return {}
    for node in ast.parse(info.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "installed_ops":
            return ast.literal_eval(node.value)
    return {}


def gpu_lines() -> list[str]:
    import torch

    lines = [f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
            )
    else:
        lines.append("GPUs visible: none")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="DIST==VERSION",
        help="fail unless DIST is installed at VERSION (a +local label is ignored)",
    )
    p.add_argument(
        "--expect-cuda",
        metavar="MAJOR.MINOR",
        help="fail unless torch is this CUDA build ('none': the CPU build)",
    )
    p.add_argument(
        "--require-op",
        action="append",
        default=[],
        metavar="OP",
        help="fail unless DeepSpeed was installed with OP prebuilt",
    )
    p.add_argument("--quiet", action="store_true", help="print only problems")
    args = p.parse_args(argv)

    problems = []
    for item in args.expect:
        dist, _, want = item.partition("==")
        have = version(dist)
        if have is None or have.split("+")[0] != want:
            problems.append(f"{dist}: expected {want}, found {have or 'not installed'}")
    ops = deepspeed_installed_ops()
    problems += [f"DeepSpeed op {op} is not prebuilt" for op in args.require_op if not ops.get(op)]
    if args.expect_cuda:
        import torch

        if args.expect_cuda == "none":
            if torch.version.cuda is not None:
                problems.append(f"torch is a CUDA {torch.version.cuda} build, expected the CPU build")
        elif torch.version.cuda is None or not torch.version.cuda.startswith(args.expect_cuda):
            problems.append(f"torch CUDA build {torch.version.cuda}, expected {args.expect_cuda}")

    try:
        gpus = gpu_lines()
    except ImportError as err:
        gpus = []
        problems.append(f"torch does not import: {err}")
    if not args.quiet:
        print(f"python {platform.python_version()} on {platform.machine()}")
        for dist in PACKAGES:
            print(f"{dist}: {version(dist) or '-'}")
        print(f"DeepSpeed prebuilt ops: {', '.join(k for k, v in ops.items() if v) or 'none'}")
        print("\n".join(gpus))
    for problem in problems:
        print(f"env_report: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
