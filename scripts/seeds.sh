#!/usr/bin/env bash
# More training seeds: for each seed given (bash scripts/seeds.sh 1 2), train the seven LoRAs and the MoA routers
# with that seed under $RUNS/seed<N> (default runs/, out of git), evaluate $SEED_METHODS on the 7-task set on them,
# and copy its result files, summary and training logs to results/<model>/seeds/seed<N>/ (under $RESULTS_ROOT, by
# default this repository); `make report` then puts them in the reports (`make seeds` does both).
# MODEL, PRESET, DATA from the environment as in the other wrappers; TRAIN_FLAGS, MOA_FLAGS and EVAL_FLAGS pass
# extra flags to the three stages.
set -euo pipefail
source "$(dirname "$0")/common.sh"
RUNS=${RUNS:-runs}
RESULTS_ROOT=${RESULTS_ROOT:-.}
# single, MoA, the SVD merge, and the five leading routing-free merges of the committed 7-task table
SEED_METHODS=${SEED_METHODS:-single,moa,svd,regmean,iso_cts,iso_c,cat,tsv_m}
usage="usage: bash scripts/seeds.sh SEED [SEED ...]  (whole numbers from 1: the committed run is seed 0)"
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
for seed in "$@"; do
    [[ $seed =~ ^[1-9][0-9]*$ ]] || { echo "seed '$seed' is not a whole number from 1; $usage" >&2; exit 2; }
done
for seed in "$@"; do
    root="$RUNS/seed$seed"
    bash train_all_tasks.sh --seed "$seed" --root "$root" ${TRAIN_FLAGS:-}
    bash train_moa.sh --seed "$seed" --root "$root" ${MOA_FLAGS:-}
    $PYTHON full_evaluation.py --tasks "$(task_set SEVEN_TASKS)" --methods "$SEED_METHODS" --model "$MODEL" \
        --preset "$PRESET" --data "$DATA" --root "$root" ${EVAL_FLAGS:-}
    # this run's results/<model> folder and where its files are committed (src/layout.py)
    paths=$($PYTHON -c "import sys; from src.layout import model_results_dir, seed_dir; run, to, m, seed = sys.argv[1:]
print(model_results_dir(run, m)); print(seed_dir(to, m, int(seed)))" "$root" "$RESULTS_ROOT" "$MODEL" "$seed")
    out=${paths%%$'\n'*} dest=${paths#*$'\n'}
    mkdir -p "$dest/7-task"
    cp "$out/7-task/"*.json "$out/7-task/"*.predictions.jsonl "$out/7-task/"summary.* "$dest/7-task/"
    cp -r "$out/train_logs" "$dest/"
done
