#!/usr/bin/env python3
"""Build, print or run the `deepspeed` command for one launch mode.

One place decides what the training launch looks like on one node and on many, so
the shell scripts, the Slurm job and the tests all agree on it:

  single    one node, all (or --num_gpus) local GPUs; no hostfile, no ssh.
  hostfile  run once, on the head node; DeepSpeed's runner reaches every node of the
            hostfile with pdsh over ssh and forwards `.deepspeed_env` to them.
  nossh     run on every node with its own --node_rank (container schedulers,
            Kubernetes, anything that starts one container per node itself).
  slurm     nossh, with node count, node rank, GPUs per node and the rendezvous
            read from the environment `srun` gives each task.

Everything after `--` goes to launchers/pretrain.py unchanged (`--config PRESET`,
dotted overrides). `--dry-run` prints the command (shell-quoted, on stdout) and the
files it would write (on stderr) instead of running it.

Standard library only: this runs before (and decides how) torch and DeepSpeed start.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("single", "hostfile", "nossh", "slurm")
PRETRAIN_SCRIPT = "launchers/pretrain.py"
DEFAULT_DS_CONFIG = "ds_configs/zero2.json"
DEFAULT_MASTER_PORT = 29500
# DeepSpeed's own default location; mount the cluster's hostfile there.
DEFAULT_HOSTFILE = "/job/hostfile"

# Forwarded to remote nodes in hostfile mode. DeepSpeed itself forwards MLFLOW*, NCCL*,
# PYTHON*, UCX* and MV2*; the others here (TORCH_NCCL_*, HF_*, the allocator, offline
# switches) would silently be missing on every node but the head one without this list.
PASS_ENV_PREFIXES = (
    "MLFLOW_",
    "NCCL_",
    "TORCH_NCCL_",
    "TORCH_DISTRIBUTED_",
    "HF_",
    "TRANSFORMERS_",
    "PIPELINE_",
)
PASS_ENV_NAMES = (
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
)
# DeepSpeed's runner writes each value into `export K=V;` (double-quoted when it holds
# anything outside [\w@%+=:,./-]) and pdsh hands that to a remote shell, so these
# characters would be expanded or break the quoting there.
_UNSAFE_VALUE = re.compile(r'["$`\\\n]')


class LaunchError(ValueError):
    """A launch setting is missing or inconsistent; the message says which and how to fix it."""


@dataclass
class Plan:
    """What a launch does: the argv to exec and the small files it needs first."""

    argv: list[str]
    files: dict[Path, str] = field(default_factory=dict)


def _env_int(environ: dict[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            # SLURM_GPUS_ON_NODE / SLURM_JOB_NUM_NODES are plain integers; "8(x2)"-style
            # counts only appear in *_PER_NODE lists, which are not read here.
            try:
                return int(value)
            except ValueError as err:
                raise LaunchError(f"{name}={value!r} is not an integer") from err
    return None


def local_gpu_count(environ: dict[str, str]) -> int | None:
    """GPUs this node may use: CUDA_VISIBLE_DEVICES if set, else what `nvidia-smi -L` lists."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        return count or None
    return None


def read_hostfile(path: Path) -> dict[str, int]:
    """Hosts and slots of an MPI-style hostfile, checked the way DeepSpeed's runner reads it."""
    if not path.is_file():
        raise LaunchError(f"hostfile {path} not found (see docker/hostfile.example)")
    hosts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not match:
            raise LaunchError(f"{path}: bad line {line!r}; expected '<host> slots=<gpus>'")
        if match.group(1) in hosts:
            raise LaunchError(f"{path}: host {match.group(1)} is listed twice")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise LaunchError(f"{path} lists no hosts")
    return hosts


def deepspeed_env_text(environ: dict[str, str], extra_names: list[str]) -> str:
    """`.deepspeed_env` body: KEY=VALUE lines of the variables to forward to every node.

    DeepSpeed splits every line at its first '=', so the file holds no comments and no
    blank lines.
    """
    names = sorted(
        name
        for name in environ
        if name.startswith(PASS_ENV_PREFIXES) or name in PASS_ENV_NAMES or name in extra_names
    )
    lines = []
    for name in names:
        value = environ[name]
        if _UNSAFE_VALUE.search(value):
            raise LaunchError(
                f"{name} holds a quote, '$', backtick, backslash or newline, which the pdsh "
                "launcher cannot forward intact; set it in the image or on every node instead"
            )
        lines.append(f"{name}={value}")
    return "".join(line + "\n" for line in lines)


def _master(opts: argparse.Namespace, environ: dict[str, str]) -> tuple[str, int]:
    addr = opts.master_addr or environ.get("MASTER_ADDR", "")
    port = opts.master_port or _env_int(environ, "MASTER_PORT") or DEFAULT_MASTER_PORT
    return addr, port


def build_plan(opts: argparse.Namespace, user_args: list[str], environ: dict[str, str]) -> Plan:
    """The deepspeed argv (and files) for `opts.mode`; raises LaunchError on bad settings."""
    if not Path(opts.ds_config).is_file():
        raise LaunchError(f"DeepSpeed config {opts.ds_config} not found (run from the repo root)")
    script = [PRETRAIN_SCRIPT, "--ds_config", opts.ds_config, *user_args]
    addr, port = _master(opts, environ)

    if opts.mode == "single":
        argv = ["deepspeed", "--master_port", str(port)]
        if opts.num_gpus:
            argv += ["--num_gpus", str(opts.num_gpus)]
        return Plan(argv + script)

    if opts.mode == "hostfile":
        hostfile = Path(opts.hostfile or environ.get("HOSTFILE", DEFAULT_HOSTFILE))
        hosts = read_hostfile(hostfile)
        argv = ["deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh"]
        argv += ["--master_port", str(port)]
        if addr:  # otherwise DeepSpeed asks the first host for `hostname -I` over ssh
            argv += ["--master_addr", addr]
        if opts.num_nodes:
            if opts.num_nodes > len(hosts):
                raise LaunchError(
                    f"--num_nodes {opts.num_nodes} > {len(hosts)} hosts in {hostfile}"
                )
            argv += ["--num_nodes", str(opts.num_nodes)]
        ssh_port = opts.ssh_port or _env_int(environ, "SSH_PORT")
        if ssh_port:
            argv += ["--ssh_port", str(ssh_port)]
        env_file = Path(environ.get("DS_ENV_FILE", ".deepspeed_env"))
        files = {env_file: deepspeed_env_text(environ, opts.pass_env)}
        return Plan(argv + script, files)

    # nossh and slurm: every node runs this with its own rank. DeepSpeed still needs a
    # hostfile to know the world (nodes x slots); with --no_ssh the names are only labels,
    # so every node writes the same synthetic one.
    slurm = opts.mode == "slurm"
    nnodes = opts.num_nodes or _env_int(
        environ, *(("SLURM_JOB_NUM_NODES", "SLURM_NNODES") if slurm else ("NNODES",))
    )
    rank = (
        opts.node_rank
        if opts.node_rank is not None
        else _env_int(environ, "SLURM_NODEID" if slurm else "NODE_RANK")
    )
    gpus = (
        opts.gpus_per_node
        or _env_int(environ, *(("SLURM_GPUS_ON_NODE",) if slurm else ("GPUS_PER_NODE",)))
        or local_gpu_count(environ)
    )
    if slurm and not addr:
        # srun sets this to the address of the node that ran it: the batch host, node 0.
        addr = environ.get("SLURM_LAUNCH_NODE_IPADDR", "")
    missing = [
        name
        for name, value in (
            ("--num_nodes/NNODES", nnodes),
            ("--node_rank/NODE_RANK", rank),
            ("--gpus_per_node/GPUS_PER_NODE", gpus),
            ("--master_addr/MASTER_ADDR", addr),
        )
        if value in (None, "")
    ]
    if missing:
        raise LaunchError(f"{opts.mode} mode needs {', '.join(missing)}")
    if not 0 <= rank < nnodes:
        raise LaunchError(f"node rank {rank} is outside [0, {nnodes})")
    if opts.hostfile:
        hostfile, files = Path(opts.hostfile), {}
        if len(read_hostfile(hostfile)) != nnodes:
            raise LaunchError(f"{hostfile} does not list {nnodes} hosts")
    else:
        hostfile = Path(environ.get("TMPDIR") or "/tmp") / f"ds_hostfile_{nnodes}x{gpus}"
        files = {hostfile: "".join(f"node-{i} slots={gpus}\n" for i in range(nnodes))}
    argv = [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(rank),
        "--master_addr",
        addr,
        "--master_port",
        str(port),
    ]
    return Plan(argv + script, files)


def write_files(files: dict[Path, str]) -> None:
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split at the first `--`: our options before it, launchers/pretrain.py's after it."""
    ours, user = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    p = argparse.ArgumentParser(
        prog="launch_cmd.py",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to launchers/pretrain.py.",
    )
    p.add_argument("mode", choices=MODES)
    p.add_argument("--ds_config", default=os.environ.get("DS_CONFIG", DEFAULT_DS_CONFIG))
    p.add_argument("--num_gpus", type=int, help="single: GPUs to use (default: all visible)")
    p.add_argument(
        "--hostfile",
        help="hostfile: the cluster's hostfile (default $HOSTFILE or "
        f"{DEFAULT_HOSTFILE}); nossh: an existing one instead of a generated one",
    )
    p.add_argument("--num_nodes", type=int, help="nodes to use (default $NNODES / Slurm's)")
    p.add_argument(
        "--node_rank", type=int, help="this node's rank (default $NODE_RANK / $SLURM_NODEID)"
    )
    p.add_argument("--gpus_per_node", type=int, help="default $GPUS_PER_NODE, Slurm's, or detected")
    p.add_argument("--master_addr", help="address of node 0 (default $MASTER_ADDR)")
    p.add_argument("--master_port", type=int, help=f"default $MASTER_PORT or {DEFAULT_MASTER_PORT}")
    p.add_argument(
        "--ssh_port", type=int, help="hostfile: sshd port in the containers (default $SSH_PORT)"
    )
    p.add_argument(
        "--pass_env",
        action="append",
        default=[],
        metavar="NAME",
        help="hostfile: also forward this variable to every node (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        default=os.environ.get("DRY_RUN", "0") not in ("", "0"),
        help="print the command and files instead of running (also DRY_RUN=1)",
    )
    return p.parse_args(ours), user


def main(argv: list[str] | None = None) -> int:
    opts, user_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = build_plan(opts, user_args, dict(os.environ))
    except LaunchError as err:
        print(f"launch_cmd.py: error: {err}", file=sys.stderr)
        return 2
    if opts.dry_run:
        for path, text in plan.files.items():
            sys.stderr.write(f"# would write {path}:\n{text}")
        print(shlex.join(plan.argv))
        return 0
    write_files(plan.files)
    sys.stdout.flush()
    os.execvp(plan.argv[0], plan.argv)  # replaces this process: signals reach deepspeed directly
    return 1  # unreachable


if __name__ == "__main__":
    sys.exit(main())
