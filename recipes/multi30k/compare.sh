#!/usr/bin/env bash
# Transformer against GNMT at equal training budgets on this machine, for each language pair and
# seed: per pair one SentencePiece model shared by every run of that pair, the same data, batching
# and search; then test BLEU and chrF at beam 5, one report per pair (seeds grouped: mean ± sd; 95%
# intervals; paired bootstrap p-value GNMT against Transformer, first seeds) and one
# BLEU-against-time plot per pair.
#
#   PAIRS=en-de SEEDS="1 2" bash recipes/multi30k/compare.sh; PAIRS="en-fr en-cs" bash recipes/multi30k/compare.sh
#   PAIRS="en-ja ja-en" bash recipes/multi30k/compare.sh
#
# Pairs: en-de, en-fr, en-cs on Multi30k (recipes/multi30k, test split test2016); en-ja and ja-en on
# small_parallel_enja (recipes/small_parallel_enja, test split test, BLEU on the given tokens:
# tok:none; $NMT_DATA/small_parallel_enja must hold its files, nmt data does not fetch them).
#
# MODELS lists the recipes compared (default: transformer gnmt, and for en-de also
# transformer-deep-enc, the 6+1 layer Transformer); the first is the baseline of the p-values.
#
# BUDGET is minutes of training per run (validation time excluded); runs go one after the
# other, each alone on the machine: models x seeds x pairs x BUDGET minutes, plus evaluation.
# Re-running the script resumes unfinished runs; raising BUDGET continues finished ones.
# UPDATES=N budgets updates instead of minutes: every run stops at N updates, which no clock
# affects, so the runs may share the machine (JOBS at once, THREADS intra-op threads each, at
# NICE); the report then reads valid BLEU by updates (AT_UPDATES, bleu-vs-updates.png) and, with
# PROBES (nmt bench on an idle machine), on each probed machine's projected clock. Wall-clock
# figures of runs that shared the machine mean nothing, and the report marks them (†).
# Output: OUT/PAIR/{transformer,gnmt}-seedN/ (runs), OUT/PAIR/report.{md,csv}, OUT/PAIR/bleu-vs-time.png
# (bleu-vs-updates.png with UPDATES), OUT/PAIR/breakdown.{md,png} (nmt report --breakdown length|frequency).
# OUT defaults to the corpus's recipes/CORPUS/results, where the measured answer is kept: checkpoints (*.pt)
# are git-ignored, the rest of a finished run (recipe, log, subwords, test hypotheses and scores) is
# committed. A run that has its scores but no last.pt is kept as recorded: it is neither trained nor
# evaluated again, so the runs of one answer can be made on different days (on the same CPU kind).
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/multi30k/pool.sh

PAIRS=${PAIRS:-en-de}
SEEDS=${SEEDS:-1}
BUDGET=${BUDGET:-40}
UPDATES=${UPDATES:-}   # set: a budget in updates (see above), BUDGET unused
JOBS=${JOBS:-1}        # with UPDATES: runs trained at once
THREADS=${THREADS:-}   # with UPDATES: intra-op threads per run (default: the recipe's)
NICE=${NICE:-0}
AT_UPDATES=${AT_UPDATES:-}  # with UPDATES: where the report reads valid BLEU (default: 5 even steps)
OUT=${OUT:-}  # empty: recipes/CORPUS/results
ROOT=${NMT_DATA:-$HOME/.cache/nmt/data}
# Valid BLEU whose first reaching is timed, per pair: a value both models of the pair reach
# within a 40-minute budget, so that the report times both (seed 1 reached, Transformer and GNMT:
# en-de 31.4 and 33.1, en-fr 47.6 and 49.1, en-cs 25.2 and 25.9). en-ja (BLEU on tok:none): both
# reach 20 within UPDATES=2000 (Transformer 31.8, GNMT 26.8); ja-en: both reach 15 by update 1,000
# (best within UPDATES=2000: 30.8 and 29.8).
# TARGETS="en-fr=50 ..." overrides some or all of them.
TARGETS="en-de=28 en-fr=45 en-cs=22 en-ja=20 ja-en=15 ${TARGETS:-}"
AT=${AT:-10,20,30,40}  # training minutes at which the report reads each model's BLEU
# Before it trains anything for a pair, the script checks this machine against the pair's runs so
# far (nmt hardware) and stops if they trained on another CPU kind. KIND (a part of what
# `nmt hardware` prints, e.g. AVX512) also requires it of this machine: the runs in results/ were
# logged before nmt recorded CPU kinds and trained where torch reports AVX512.
KIND=${KIND:-}
# PROBES: nmt bench files (a glob is fine) whose machines the report projects every run's updates
# onto; with them, runs trained on different machines compare on that projected clock. Default for
# en-de: results/probes/*.json, since its 6+1 runs trained on another CPU kind than the others; for
# en-ja and ja-en: recipes/small_parallel_enja/results/probes/*-PAIR.json (their runs count updates).
PROBES=${PROBES:-}

target() {  # target PAIR: the last value given for PAIR in TARGETS
    local t="" kv
    for kv in $TARGETS; do [ "${kv%%=*}" = "$1" ] && t=${kv#*=}; done
    [ -n "$t" ] || { echo "compare.sh: no valid BLEU target for $1: add $1=BLEU to TARGETS" >&2; exit 1; }
    echo "$t"
}

corpus() {  # corpus PAIR: the directory of its recipes (recipes/CORPUS) and data ($NMT_DATA/CORPUS)
    case "$1" in en-ja|ja-en) echo small_parallel_enja;; *) echo multi30k;; esac
}

models() {  # models PAIR: the recipes compared on PAIR, the baseline first
    if [ -n "${MODELS:-}" ]; then echo "$MODELS"
    elif [ "$1" = en-de ]; then echo "transformer gnmt transformer-deep-enc"
    else echo "transformer gnmt"; fi
}

recipe() {  # recipe MODEL PAIR: en-de has the original recipes, the others a -PAIR suffix
    if [ "$2" = en-de ]; then echo "recipes/multi30k/$1.yaml"; else echo "recipes/$(corpus "$2")/$1-$2.yaml"; fi
}

probes() {  # probes PAIR: the --time-from options of its report
    local p list=$PROBES
    if [ -z "$list" ]; then  # each run takes the probe of its own recipe and data from these
        case "$1" in
            en-de) list="recipes/multi30k/results/probes/*.json";;
            en-ja|ja-en) list="recipes/small_parallel_enja/results/probes/*-$1.json";;
        esac
    fi
    for p in $list; do [ -f "$p" ] && printf -- '--time-from\n%s\n' "$p"; done
    return 0
}

test_split() {  # test_split PAIR: the files the test scores come from, as the pair's recipes name them
    case "$(corpus "$1")" in small_parallel_enja) echo test;; *) echo test2016;; esac
}

for pair in $PAIRS; do target "$pair" >/dev/null; done  # a missing target stops here, not hours later
fetched=""
for pair in $PAIRS; do  # the data of every pair, before anything trains
    src=${pair%-*} tgt=${pair#*-} data=$ROOT/$(corpus "$pair")
    if [ "$(corpus "$pair")" = multi30k ]; then
        [ -n "$fetched" ] || nmt data multi30k >/dev/null
        fetched=1
    elif [ ! -f "$data/train.$src" ] || [ ! -f "$data/train.$tgt" ]; then
        echo "compare.sh: no $data/train.$src and train.$tgt for $pair; set NMT_DATA to a directory holding" \
             "$(corpus "$pair")/ (GitHub odashi/small_parallel_enja, files renamed as ../shared/data/README.md says)" >&2
        exit 1
    fi
done
read -r -a seeds <<<"$SEEDS"
first=${seeds[0]}
for pair in $PAIRS; do
    src=${pair%-*} tgt=${pair#*-} data=$ROOT/$(corpus "$pair") split=$(test_split "$pair")
    for model in $(models "$pair"); do
        [ -f "$(recipe "$model" "$pair")" ] || { echo "compare.sh: no recipe $(recipe "$model" "$pair") for $pair" >&2; exit 1; }
    done
    dir=${OUT:-recipes/$(corpus "$pair")/results}/$pair
    shared=$dir/transformer-seed$first  # its SentencePiece model serves every run of the pair
    todo=()  # MODEL:SEED of the runs to train or resume
    for seed in "${seeds[@]}"; do
        for model in $(models "$pair"); do
            run=$dir/$model-seed$seed
            if [ ! -f "$run/last.pt" ] && compgen -G "$run/eval/*.json" >/dev/null; then
                echo "compare.sh: $run is kept as recorded (scores, no last.pt to go on from)" >&2
                continue
            fi
            todo+=("$model:$seed")
        done
    done
    if [ "${#todo[@]}" -gt 0 ]; then  # once per pair, before its first training
        made=()
        for r in "$dir"/*-seed*/; do [ -f "$r/log.jsonl" ] && made+=("${r%/}"); done
        here=$(nmt hardware ${made[@]+"${made[@]}"})
        case "$here" in *"$KIND"*) ;; *) echo "compare.sh: this machine is $here, not $KIND" >&2; exit 1;; esac
    fi
    budget=(--set train.max_minutes="$BUDGET") at_once=1  # a minutes budget: each run alone
    if [ -n "$UPDATES" ]; then
        budget=(--set train.max_minutes=0 --set train.max_steps="$UPDATES") at_once=$JOBS
        [ -z "$THREADS" ] || budget+=(--set train.threads="$THREADS")
        # The pair's SentencePiece model first, so that runs started together can all reuse it.
        [ "${#todo[@]}" -eq 0 ] || [ -f "$shared/spm.model" ] || nmt prepare \
            "$(recipe "${todo[0]%%:*}" "$pair")" --run "$shared" --no-progress >&2
    fi
    for job in ${todo[@]+"${todo[@]}"}; do
        model=${job%%:*} seed=${job#*:} run=$dir/${job%%:*}-seed${job#*:}
        reuse=()
        [ "$run" = "$shared" ] || reuse=(--set tokenizer.reuse="$shared")
        # Validating every 200 updates draws the BLEU-against-time curves finely enough to
        # read off 10, 20 and 40 minutes; validation time is kept off the training clock.
        (
            nice -n "$NICE" nmt train "$(recipe "$model" "$pair")" --run "$run" --no-test --set train.seed="$seed" \
                "${budget[@]}" --set train.valid_every=200 ${reuse[@]+"${reuse[@]}"}
            nice -n "$NICE" nmt eval --model "$run" --src "$data/$split.$src" --ref "$data/$split.$tgt" --beam 5
        ) &
        pool_add $! "$at_once"
    done
    pool_wait
    for model in $(models "$pair"); do
        [ -f "$dir/$model-seed$first/best.pt" ] || continue  # a kept run keeps its plot
        # matplotlib's default font (DejaVu Sans) has no Japanese glyphs: every Japanese label would be
        # a box, so en-ja and ja-en get no plot here (nmt attention by hand, with a font that has them).
        [ "$(corpus "$pair")" = multi30k ] || continue
        nmt attention --model "$dir/$model-seed$first" -o "$dir/attention-$model.png" \
            --text "A man in an orange hat starring at something."
    done
    runs=()
    for model in $(models "$pair"); do
        for seed in "${seeds[@]}"; do runs+=("$dir/$model-seed$seed"); done
    done
    # Seeds grouped; the p-values compare each recipe's first seed with the first model's.
    read -r -a compared <<<"$(models "$pair")"
    options=(--group-seeds --baseline "${compared[0]}-seed$first" --target "$(target "$pair")")
    mapfile -t projected < <(probes "$pair")
    options+=(${projected[@]+"${projected[@]}"})
    if [ -n "$UPDATES" ]; then  # valid BLEU by updates; by projected time where probes are given
        marks=$AT_UPDATES
        [ -n "$marks" ] || marks=$(seq -s, "$((UPDATES / 5))" "$((UPDATES / 5))" "$UPDATES")
        options+=(--at-updates "$marks")
        plots=(--plot-updates "$dir/bleu-vs-updates.png")
        [ "${#projected[@]}" -eq 0 ] || plots+=(--plot "$dir/bleu-vs-time.png")
    else
        options+=(--at "$AT")
        plots=(--plot "$dir/bleu-vs-time.png" --speed)
    fi
    nmt report "${runs[@]}" "${options[@]}" "${plots[@]}" | tee "$dir/report.md"
    nmt report "${runs[@]}" "${options[@]}" --format csv > "$dir/report.csv"
    # Where each model wins: test scores by source length, word F by training frequency.
    nmt report "${runs[@]}" --baseline "${compared[0]}-seed$first" --breakdown length --breakdown frequency \
        --plot-breakdown "$dir/breakdown.png" > "$dir/breakdown.md"
    echo "report ($pair): $dir/report.md, $dir/report.csv, $dir/breakdown.md and their plots" >&2
done
