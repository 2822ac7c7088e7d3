#!/usr/bin/env bash
# The main job on the built-in default (nothing downloaded): builtin:pydocs -> sentencepiece
# tokenizer + Megatron shards -> tiny Base pretraining -> liu Coprocessor -> export -> a
# ppl-at-k summary. Two ranks on CPU (gloo) or on two GPUs. Finished stages are reused.
set -euo pipefail
cd "$(dirname "$0")/.."

if python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DS_CONFIG=ds_configs/zero2.json
else
  DS_CONFIG=ds_configs/zero2_cpu.json
fi
exec deepspeed --num_gpus 2 launchers/pretrain.py --ds_config "$DS_CONFIG" "$@"
