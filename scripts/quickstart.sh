#!/usr/bin/env bash
# Zero-download quickstart: train a small sentencepiece tokenizer on builtin:pydocs (English
# documentation bundled with Python), build Megatron shards from the same corpus, verify,
# inspect. Safe to re-run: a finished, verified tokenizer/dataset is reused, anything else rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${QUICKSTART_OUT:-runs/quickstart}"
TOK="$OUT/tokenizer/spm"
DATA="$OUT/data"
data_prep() { python -m data_prep "$@"; }

if [[ ! -f "$TOK.model" ]]; then
  echo "== training a sentencepiece tokenizer (BPE, vocab 8000) on builtin:pydocs"
  data_prep tokenizer train --input builtin:pydocs --output "$TOK" --vocab-size 8000 \
    --model-type bpe --special-tokens '<|latent|>'
else
  echo "== reusing tokenizer $TOK.model"
fi

if [[ -f "$DATA/manifest.json" ]] && data_prep verify "$DATA" >/dev/null 2>&1; then
  echo "== reusing dataset $DATA (it verifies)"
else
  echo "== building shards from builtin:pydocs into $DATA"
  # An unfinished build is resumed; a damaged or different one is rebuilt.
  if ! data_prep build --input builtin:pydocs --tokenizer "$TOK.model" --output "$DATA" \
      --val-fraction 0.05 --shard-size 4M; then
    data_prep build --input builtin:pydocs --tokenizer "$TOK.model" --output "$DATA" \
      --val-fraction 0.05 --shard-size 4M --overwrite
  fi
fi

echo "== verify"
data_prep verify "$DATA"
echo "== inspect"
data_prep inspect "$DATA" --samples 2
