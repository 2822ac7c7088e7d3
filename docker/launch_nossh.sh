#!/usr/bin/env bash
# Multi-node training without ssh (DeepSpeed --no_ssh): run it on EVERY node, in that
# node's container, each with its own node rank. For schedulers that start one
# container per node themselves (Kubernetes, Nomad, cloud batch, Slurm: see
# docker/slurm/pretrain.sbatch). Nodes meet at MASTER_ADDR:MASTER_PORT (node 0).
#
#   NNODES=4 NODE_RANK=2 MASTER_ADDR=10.0.0.1 docker/launch_nossh.sh [-- pretrain args]
#
#   NNODES         number of nodes (or --num_nodes)
#   NODE_RANK      this node, 0..NNODES-1 (or --node_rank); a Kubernetes Indexed Job's
#                  JOB_COMPLETION_INDEX is used when NODE_RANK is unset
#   MASTER_ADDR    address of node 0, reachable from every node (or --master_addr)
#   MASTER_PORT    default 29500
#   GPUS_PER_NODE  default: the GPUs this container sees
# Each node's own environment (MLFLOW_TRACKING_URI, NCCL_*) reaches its ranks directly.
# DRY_RUN=1 prints the deepspeed command instead of running it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${NODE_RANK:-}" && -n "${JOB_COMPLETION_INDEX:-}" ]]; then
  export NODE_RANK="${JOB_COMPLETION_INDEX}"
fi

exec python docker/launch_cmd.py nossh "$@"
