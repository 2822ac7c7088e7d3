#!/usr/bin/env bash
# Issue 15's tiny-scale Countdown comparison on CPU (paper 000 §4.2: no curriculum, every step
# replaced by N_L latents): one CoT Base, no-CoT, then h2 and soft_embedding at N_L = 1, 4, 8, all
# with the same budget; evaluation on held-out Countdown problems (accuracy ± stderr, answer NLL ± stderr).
#
#   bash scripts/experiments/reason_countdown.sh [SEED] [STAGE...]   (STAGE: data base nocot h2 soft_embedding eval)
#
# Sizes as reason_prosqa.sh: a 4-layer d=128 GPT-2 with a 512-piece sentencepiece tokenizer trained on
# the Countdown training text, batch 32, lr 1e-3 (ds_configs/zero2_cpu_reason.json); 3 operands.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${1:-0}; shift || true
STAGES=${*:-data base nocot h2 soft_embedding eval}
ROOT=runs/r15cd/seed$SEED
T=runs/tasks
NLS="1 4 8"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODEL="model.overrides.n_layer=4 model.overrides.d_model=128 model.overrides.n_head=4 model.overrides.vocab_size=512 model.overrides.eos_token_id=2 model.overrides.max_position_embeddings=128"
DATA="data.train_file=$T/countdown3-train.json data.valid_file=$T/countdown3-valid.json data.tokenizer=$T/countdown3-spm.model data.max_len=96 data.seed=$((1234 + SEED))"
run() { python launchers/pretrain.py --ds_config ds_configs/zero2_cpu_reason.json "$@" tracking.enabled=false; }
for stage in $STAGES; do
  case $stage in
    data)
      [ -f $T/countdown3-spm.model ] && continue
      python -m data_prep tasks countdown --split train --operands 3 --n 16384 --output $T/countdown3-train.json
      python -m data_prep tasks countdown --split eval --operands 3 --n 256 --seed 1 --output $T/countdown3-valid.json
      python -m data_prep tasks countdown --split eval --operands 3 --n 512 --seed 0 --output $T/countdown3-heldout.json
      python scripts/experiments/task_text.py $T/countdown3-train.json $T/countdown3-train-text.jsonl
      python -m data_prep tokenizer train --input $T/countdown3-train-text.jsonl --output $T/countdown3-spm --vocab-size 512 ;;
    base)  [ -d $ROOT/cot/export ] || run --config reason-countdown-cot $MODEL $DATA train.max_steps=800 train.eval_every=200 train.output_dir=$ROOT/cot ;;
    nocot) [ -d $ROOT/nocot/export ] || run --config reason-countdown-nocot $DATA 'model.overrides={}' model.path=$ROOT/cot/export train.max_steps=600 train.eval_every=200 train.output_dir=$ROOT/nocot ;;
    h2|soft_embedding)
      for nl in $NLS; do
        out=$ROOT/$stage-nl$nl
        [ -d $out/export ] || run --config reason-countdown-$stage $DATA model.path=$ROOT/cot/export curriculum.n_latents=$nl train.max_steps=600 train.eval_every=200 train.output_dir=$out
      done ;;
    eval)
      models=()
      for m in cot nocot h2-nl1 h2-nl4 h2-nl8 soft_embedding-nl1 soft_embedding-nl4 soft_embedding-nl8; do [ -d $ROOT/$m/export ] && models+=(--model $ROOT/$m/export); done
      python launchers/evaluate.py reasoning --task countdown --data $T/countdown3-heldout.json "${models[@]}" --tokenizer $T/countdown3-spm.model --max-new-tokens 48 --out $ROOT/eval-heldout --dump-nll $ROOT/eval-heldout/nll.jsonl ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
