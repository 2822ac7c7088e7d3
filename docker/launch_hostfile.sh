#!/usr/bin/env bash
# Multi-node training through DeepSpeed's hostfile launcher. Run it ONCE, inside the
# container on the head node; DeepSpeed's runner then logs into every host of the
# hostfile over ssh (pdsh), into the same image at the same path, and starts one
# per-node launcher there. Every node's container must run with START_SSHD=1 and host
# networking, with the same key pair mounted (docker/README.md, "hostfile mode").
#
#   docker/launch_hostfile.sh [--hostfile /job/hostfile] [--num_nodes N] [-- pretrain args]
#
# Options are docker/launch_cmd.py's. Variables forwarded to every node (MLFLOW_*,
# NCCL_*, TORCH_NCCL_*, HF_*, ...) are written to ./.deepspeed_env, which the runner
# reads. DRY_RUN=1 prints the deepspeed command and that file instead of running.
set -euo pipefail

# The runner starts the remote side in its own working directory: the repo root,
# which is /workspace in every container of the image.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${DRY_RUN:-0}" != "1" ]] && ! command -v pdsh > /dev/null; then
  echo "launch_hostfile: pdsh not found; run this inside the project image" >&2
  exit 1
fi

exec python docker/launch_cmd.py hostfile "$@"
