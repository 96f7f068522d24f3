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
# the evaluation stage split: the paper's methods and baselines, and the merges published since
$PYTHON - "$slug" >> "$times.tmp" <<'PY'
import json, sys
from pathlib import Path
paper = {"base", "majority", "single", "moa", "concat", "weight_sum", "svd"}
spent = {True: 0.0, False: 0.0}
for f in Path("results", sys.argv[1]).glob("*-task/*.json"):
    r = json.loads(f.read_text())
    if "total_seconds" in r:
        spent[r["method"] in paper] += r["total_seconds"]
print(f"| of which the paper's methods and baselines | {spent[True]:.0f} |")
print(f"| of which the merges of 2023-2025 (selection and fitting included) | {spent[False]:.0f} |")
PY
mv "$times.tmp" "$times"
cat "$times"
for n in 5 7; do echo; echo "## $n tasks"; cat "results/$slug/$n-task/summary.md"; done
