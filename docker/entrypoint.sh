#!/usr/bin/env bash
# Container entrypoint. Every job log starts with what the container actually has
# (versions, prebuilt DeepSpeed ops, visible GPUs), because "which torch/CUDA did that
# run use" is the first question when a cluster job misbehaves. With START_SSHD=1 it
# also starts the sshd that DeepSpeed's hostfile (pdsh) launcher logs into.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ "${PIPELINE_QUIET:-0}" != "1" ]]; then
  # A broken report must not stop the container: the command may be the fix.
  python "${here}/env_report.py" || echo "entrypoint: env_report.py failed, continuing" >&2
fi

if [[ "${START_SSHD:-0}" == "1" ]]; then
  "${here}/start_sshd.sh"
fi

# exec: the command becomes the process that receives `docker stop`'s SIGTERM.
exec "$@"
