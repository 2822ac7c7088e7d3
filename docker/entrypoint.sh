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

# Not a plain `exec "$@"`: `docker stop` signals PID 1 only, and the deepspeed runner
# neither handles SIGTERM as PID 1 nor passes it to its ranks. forward_signals.py signals
# the command's whole process group, so every rank checkpoints, and waits for them.
exec python "${here}/forward_signals.py" "$@"
