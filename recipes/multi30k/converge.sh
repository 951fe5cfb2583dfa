#!/usr/bin/env bash
# Both en->de models trained until valid BLEU stops improving, counted in updates, not minutes:
# the Transformer and the GNMT recipes unchanged except for when they stop, two seeds each, one
# SentencePiece model (results/en-de/transformer-seed1's, as in the 40-minute comparison).
#
#   SEEDS="1 2" bash recipes/multi30k/converge.sh           # train or resume every run, then report
#   JOBS=4 NICE=19 bash recipes/multi30k/converge.sh        # all four at once, one thread each
#
# A run stops after PATIENCE validations (every VALID_EVERY updates) without a better valid BLEU,
# or at CAP updates: the report then says "at CAP updates", not converged. Updates do not depend on
# the clock, so these runs may share the machine with other work; their wall-clock figures then mean
# nothing, and each log window records the run's own CPU seconds and the machine's busy CPU seconds
# (/proc/stat) so the report can tell. Re-running the script resumes every unfinished run from its
# last.pt (exact resume: the same parameters as an uninterrupted run); last.pt is git-ignored, so
# a run moves to another machine by copying its directory, last.pt included.
# Output: OUT/{transformer,gnmt}-seedN/ (runs), OUT/report.{md,csv} (valid BLEU by updates, how each
# run ended, test scores at beam 5 with intervals and p-values), OUT/bleu-vs-updates.png,
# OUT/breakdown.{md,png} (test scores by source length, word F by training frequency).
set -euo pipefail
cd "$(dirname "$0")/../.."

SEEDS=${SEEDS:-1 2}
MODELS=${MODELS:-transformer gnmt}
CAP=${CAP:-10000}
PATIENCE=${PATIENCE:-6}
VALID_EVERY=${VALID_EVERY:-250}
JOBS=${JOBS:-1}        # runs trained at once; each gets THREADS intra-op threads
THREADS=${THREADS:-1}
NICE=${NICE:-0}
AT_UPDATES=${AT_UPDATES:-1000,2000,3000,4000,6000,8000,10000}  # where the report reads valid BLEU
OUT=${OUT:-recipes/multi30k/results/en-de-converge}
ROOT=${NMT_DATA:-$HOME/.cache/nmt/data}
SHARED=recipes/multi30k/results/en-de/transformer-seed1  # the pair's SentencePiece model

nmt data multi30k >/dev/null
mkdir -p "$OUT"

finished() {  # finished RUN: stopped by its patience, or by this CAP
    [ -f "$1/log.jsonl" ] || return 1
    local last; last=$(tail -n 1 "$1/log.jsonl")
    case "$last" in *'"event": "end"'*'(train.patience)'*|*'"event": "end"'*"max_steps=$CAP\""*) return 0;; esac
    return 1
}

train() {  # train MODEL SEED: train or resume one run, then its test score at beam 5
    local run=$OUT/$1-seed$2
    if ! finished "$run"; then
        nice -n "$NICE" nmt train "recipes/multi30k/$1.yaml" --run "$run" --no-test \
            --set train.seed="$2" --set train.max_minutes=0 --set train.max_steps="$CAP" \
            --set train.patience="$PATIENCE" --set train.valid_every="$VALID_EVERY" \
            --set train.threads="$THREADS" --set tokenizer.reuse="$SHARED" >>"$OUT/$1-seed$2.log" 2>&1 || {
            local status=$?  # refused or stopped: say why here too, not only in the run's log
            echo "converge.sh: $run: $(tail -n 1 "$OUT/$1-seed$2.log")" >&2
            return "$status"
        }
    fi
    finished "$run" || return 0  # stopped by a signal: resumed by the next run of this script
    compgen -G "$run/eval/*.json" >/dev/null || nice -n "$NICE" nmt eval --model "$run" \
        --src "$ROOT/multi30k/test2016.en" --ref "$ROOT/multi30k/test2016.de" --beam 5 >>"$OUT/$1-seed$2.log" 2>&1
}

source recipes/multi30k/pool.sh
for seed in $SEEDS; do
    for model in $MODELS; do
        train "$model" "$seed" &
        pool_add $! "$JOBS"
    done
done
pool_wait

runs=()
for model in $MODELS; do for seed in $SEEDS; do runs+=("$OUT/$model-seed$seed"); done; done
read -r -a models <<<"$MODELS"
read -r -a seeds <<<"$SEEDS"
options=(--group-seeds --baseline "${models[0]}-seed${seeds[0]}" --target 28 --at-updates "$AT_UPDATES")
nmt report "${runs[@]}" "${options[@]}" --plot-updates "$OUT/bleu-vs-updates.png" | tee "$OUT/report.md"
nmt report "${runs[@]}" "${options[@]}" --format csv > "$OUT/report.csv"
nmt report "${runs[@]}" --baseline "${models[0]}-seed${seeds[0]}" --breakdown length --breakdown frequency \
    --plot-breakdown "$OUT/breakdown.png" > "$OUT/breakdown.md"
