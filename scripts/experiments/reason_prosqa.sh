#!/usr/bin/env bash
# Issue 15's tiny-scale ProsQA comparison on CPU: one Base (CoT fine-tune), then no-CoT and every
# latent variant fine-tuned from it with the same budget, then evaluation on held-out ProsQA-mini
# and the official ProsQA test set (accuracy ± stderr, answer NLL ± stderr).
#
#   bash scripts/experiments/reason_prosqa.sh [SEED] [STAGE...]      (STAGE: data base nocot VARIANT eval)
#
# Sizes: a 4-layer d=128 GPT-2 with a 512-piece sentencepiece tokenizer trained on the ProsQA-mini
# training text (the GPT-2 vocabulary's head would cost ~10x the body at this size), batch 32,
# lr 1e-3 (ds_configs/zero2_cpu_reason.json); curriculum c=2, one epoch per stage, max stage 2 (N_L=4).
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${1:-0}; shift || true
STAGES=${*:-data base nocot pause soft_embedding liu h1 h2 coconut eval}
ROOT=runs/r15/seed$SEED
T=runs/tasks
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODEL="model.overrides.n_layer=4 model.overrides.d_model=128 model.overrides.n_head=4 model.overrides.vocab_size=512 model.overrides.eos_token_id=2 model.overrides.max_position_embeddings=576"
DATA="data.train_file=$T/prosqa-train.json data.valid_file=$T/prosqa-mini-valid.json data.tokenizer=$T/prosqa-spm.model data.max_len=256 data.seed=$((1234 + SEED))"
CUR="curriculum.latents_per_step=2 curriculum.epochs_per_stage=1 curriculum.max_stage=2"
run() { python launchers/pretrain.py --ds_config ds_configs/zero2_cpu_reason.json "$@" tracking.enabled=false; }
for stage in $STAGES; do
  case $stage in
    data)
      python -m data_prep tasks prosqa --split train --preset mini --n 4096 --output $T/prosqa-train.json
      python -m data_prep tasks prosqa --split train --preset mini --n 256 --seed 999 --output $T/prosqa-mini-valid.json
      python -m data_prep tasks prosqa --split train --preset mini --n 512 --seed 777 --output $T/prosqa-mini-heldout.json
      python -m data_prep tasks prosqa --split test --output $T/prosqa-test.json
      python scripts/experiments/task_text.py $T/prosqa-train.json $T/prosqa-train-text.jsonl
      python -m data_prep tokenizer train --input $T/prosqa-train-text.jsonl --output $T/prosqa-spm --vocab-size 512 ;;
    base)  [ -d $ROOT/cot/export ] || run --config reason-prosqa-cot $MODEL $DATA train.max_steps=800 train.eval_every=200 train.output_dir=$ROOT/cot ;;
    nocot) [ -d $ROOT/nocot/export ] || run --config reason-prosqa-nocot $DATA 'model.overrides={}' model.path=$ROOT/cot/export train.max_steps=600 train.eval_every=200 train.output_dir=$ROOT/nocot ;;
    pause|soft_embedding|liu|h1|h2)
      [ -d $ROOT/$stage/export ] || run --config reason-prosqa-$stage $DATA $CUR model.path=$ROOT/cot/export train.max_steps=600 train.eval_every=200 train.output_dir=$ROOT/$stage ;;
    coconut)  # the same Base, curriculum and budget; Coconut's stage 0 (full CoT) trains too, as h2's does
      [ -d $ROOT/coconut/export ] || run --config reason-prosqa-coconut $DATA $CUR 'model.overrides={}' model.path=$ROOT/cot/export curriculum.first_stage=0 train.max_steps=600 train.eval_every=200 train.output_dir=$ROOT/coconut ;;
    eval)
      models=()
      for m in cot nocot pause soft_embedding liu h1 h2 coconut; do [ -d $ROOT/$m/export ] && models+=(--model $ROOT/$m/export); done
      python launchers/evaluate.py reasoning --task prosqa --data $T/prosqa-mini-heldout.json "${models[@]}" --tokenizer $T/prosqa-spm.model --max-new-tokens 64 --out $ROOT/eval-mini --dump-nll $ROOT/eval-mini/nll.jsonl
      python launchers/evaluate.py reasoning --task prosqa --data $T/prosqa-test.json "${models[@]}" --tokenizer $T/prosqa-spm.model --max-new-tokens 64 --out $ROOT/eval-test --dump-nll $ROOT/eval-test/nll.jsonl ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
