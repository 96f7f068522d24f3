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
[ $# -gt 0 ] || { echo "usage: bash scripts/seeds.sh SEED [SEED ...]  (the committed run is seed 0)" >&2; exit 2; }
for seed in "$@"; do
    root="$RUNS/seed$seed"
    bash train_all_tasks.sh --seed "$seed" --root "$root" ${TRAIN_FLAGS:-}
    bash train_moa.sh --seed "$seed" --root "$root" ${MOA_FLAGS:-}
    $PYTHON full_evaluation.py --tasks "$(task_set SEVEN_TASKS)" --methods "$SEED_METHODS" --model "$MODEL" \
        --preset "$PRESET" --data "$DATA" --root "$root" ${EVAL_FLAGS:-}
    # this run's results/<model> folder and where its files are committed (src/layout.py)
    read -r out dest <<< "$($PYTHON -c "import sys; from src.layout import model_results_dir as d, seed_dir
m, run, seed, to = sys.argv[1:]; print(d(run, m), seed_dir(to, m, int(seed)))" "$MODEL" "$root" "$seed" "$RESULTS_ROOT")"
    mkdir -p "$dest/7-task"
    cp "$out/7-task/"*.json "$out/7-task/"*.predictions.jsonl "$out/7-task/"summary.* "$dest/7-task/"
    cp -r "$out/train_logs" "$dest/"
done
