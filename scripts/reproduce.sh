#!/usr/bin/env bash
# The three stages of the paper on $MODEL with $PRESET, timed; prints the summary tables at the end.
set -euo pipefail
source "$(dirname "$0")/common.sh"
slug=$(basename "$MODEL")
mkdir -p "results/$slug"
times="results/$slug/reproduce_times.md"
printf '| stage | wall time (s) |\n|---|---|\n' > "$times.tmp"
for stage in train_all_tasks train_moa run_all_evaluation; do
    start=$(date +%s)
    bash "$stage.sh"
    echo "| $stage.sh | $(( $(date +%s) - start )) |" >> "$times.tmp"
done
mv "$times.tmp" "$times"
cat "$times"
for n in 5 7; do echo; echo "## $n tasks"; cat "results/$slug/$n-task/summary.md"; done
