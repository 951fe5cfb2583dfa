#!/usr/bin/env bash
# Transformer against GNMT on Multi30k en->de at equal training budgets on this machine:
# one shared SentencePiece model, the same data, batching and search; then test2016 BLEU and
# chrF at beam 5, the report table and the BLEU-against-time plot.
#
#   BUDGET=80 OUT=runs/compare bash recipes/multi30k/compare.sh
#
# BUDGET is minutes of training per model (validation time excluded). Re-running the script
# resumes unfinished runs; raising BUDGET continues finished ones.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUDGET=${BUDGET:-80}
OUT=${OUT:-runs/compare}
DATA=${NMT_DATA:-$HOME/.cache/nmt/data}/multi30k
TARGET=${TARGET:-30}
AT=${AT:-10,20,40,80}  # training minutes at which the report reads each model's BLEU

nmt data multi30k >/dev/null
# Validating every 200 updates draws the BLEU-against-time curves finely enough to read off
# 10, 20 and 40 minutes; validation time is kept off the training clock.
nmt train recipes/multi30k/transformer.yaml --run "$OUT/transformer" --no-test \
    --set train.max_minutes="$BUDGET" --set train.valid_every=200
# The GNMT reads exactly the subwords the Transformer was trained on.
nmt train recipes/multi30k/gnmt.yaml --run "$OUT/gnmt" --no-test \
    --set train.max_minutes="$BUDGET" --set train.valid_every=200 \
    --set tokenizer.reuse="$OUT/transformer"

for model in transformer gnmt; do
    nmt eval --model "$OUT/$model" --src "$DATA/test2016.en" --ref "$DATA/test2016.de" --beam 5
    nmt attention --model "$OUT/$model" -o "$OUT/attention-$model.png" \
        --text "A man in an orange hat starring at something."
done

nmt report "$OUT/transformer" "$OUT/gnmt" --target "$TARGET" --at "$AT" --plot "$OUT/bleu-vs-time.png" --speed \
    | tee "$OUT/report.md"
nmt report "$OUT/transformer" "$OUT/gnmt" --target "$TARGET" --at "$AT" --format csv > "$OUT/report.csv"
echo "report: $OUT/report.md, $OUT/report.csv, $OUT/bleu-vs-time.png" >&2
