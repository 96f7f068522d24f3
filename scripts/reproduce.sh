#!/usr/bin/env bash
# The three stages of the paper on $MODEL with $PRESET (and $METHODS, if set), timed; prints the summary tables.
set -euo pipefail
source "$(dirname "$0")/common.sh"
slug=$(basename "$MODEL")
mkdir -p "results/$slug"
times="results/$slug/reproduce_times${METHODS:+-${METHODS//,/-}}.md"   # METHODS=paper: reproduce_times-paper.md
run_start=$(date +%s)
printf '| stage | wall time (s) |\n|---|---|\n' > "$times.tmp"
for stage in train_all_tasks train_moa run_all_evaluation; do
    start=$(date +%s)
    bash "$stage.sh"
    echo "| $stage.sh | $(( $(date +%s) - start )) |" >> "$times.tmp"
done
# the evaluation stage split: the paper's methods and baselines, and the merges published since (this run's files)
$PYTHON - "$slug" "$run_start" >> "$times.tmp" <<'PY'
import json, sys
from pathlib import Path
from src.layout import PAPER_METHODS
spent = {True: 0.0, False: 0.0}
for f in Path("results", sys.argv[1]).glob("*-task/*.json"):
    r = json.loads(f.read_text())
    if "total_seconds" in r and f.stat().st_mtime >= int(sys.argv[2]):
        spent[r["method"] in PAPER_METHODS] += r["total_seconds"]
print(f"| of which the paper's methods and baselines | {spent[True]:.0f} |")
print(f"| of which the merges of 2023-2025 (selection and fitting included) | {spent[False]:.0f} |")
PY
mv "$times.tmp" "$times"
cat "$times"
for n in 5 7; do echo; echo "## $n tasks"; cat "results/$slug/$n-task/summary.md"; done
# the sweep that chose the cpu preset is committed, not rerun: each setting trains the seven LoRAs again (18-31 min here)
sweep="results/$slug/preset_sweep.md"
if [ "$PRESET" = cpu ] && [ -f "$sweep" ]; then echo; echo "## The sweep that chose the cpu preset (committed)"; cat "$sweep"; fi
