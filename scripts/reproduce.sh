#!/usr/bin/env bash
# The three stages of the paper on $MODEL with $PRESET (and $METHODS, if set), timed, into a folder of their own
# ($REPRODUCE_ROOT, default runs/reproduce, out of git: its adapters/ and results/), then the reproduction report:
# this run's normalized scores and predictions against the committed ones under $COMMITTED_ROOT (default: this
# repository; retrained seed 0's first where it has the method, then the committed run's), with a one-line verdict
# (src/reproduction.py). The committed results are never written; a maintainer
# who wants this run's files committed runs `make update-results` (scripts/update_results.sh) afterwards.
# TRAIN_FLAGS, MOA_FLAGS and EVAL_FLAGS pass extra flags to the three stages.
set -euo pipefail
source "$(dirname "$0")/common.sh"
root=${REPRODUCE_ROOT:-runs/reproduce}
committed_root=${COMMITTED_ROOT:-.}
slug=$(basename "$MODEL")
out="$root/results/$slug"
mkdir -p "$out"
times="$out/reproduce_times${METHODS:+-${METHODS//,/-}}.md"   # METHODS=paper: reproduce_times-paper.md
run_start=$(date +%s)
printf '| stage | wall time (s) |\n|---|---|\n' > "$times.tmp"
for stage in train_all_tasks train_moa run_all_evaluation; do
    start=$(date +%s)
    flags_var=$(case $stage in train_all_tasks) echo TRAIN_FLAGS;; train_moa) echo MOA_FLAGS;; *) echo EVAL_FLAGS;; esac)
    bash "$stage.sh" --root "$root" ${!flags_var:-}
    echo "| $stage.sh | $(( $(date +%s) - start )) |" >> "$times.tmp"
done
# the evaluation stage split: the paper's methods and baselines, and the merges published since (this run's files)
$PYTHON - "$out" "$run_start" >> "$times.tmp" <<'PY'
import json, sys
from pathlib import Path
from src.layout import PAPER_METHODS
spent = {True: 0.0, False: 0.0}
for f in Path(sys.argv[1]).glob("*-task/*.json"):
    r = json.loads(f.read_text())
    if "total_seconds" in r and f.stat().st_mtime >= int(sys.argv[2]):
        spent[r["method"] in PAPER_METHODS] += r["total_seconds"]
print(f"| of which the paper's methods and baselines | {spent[True]:.0f} |")
print(f"| of which the merges of 2023-2025 (selection and fitting included) | {spent[False]:.0f} |")
PY
mv "$times.tmp" "$times"
cat "$times"
for n in 5 7; do echo; echo "## $n tasks"; cat "$out/$n-task/summary.md"; done
# the sweep that chose the cpu preset is committed, not rerun: each setting trains the seven LoRAs again (18-31 min here)
sweep="$committed_root/results/$slug/preset_sweep.md"
if [ "$PRESET" = cpu ] && [ -f "$sweep" ]; then echo; echo "## The sweep that chose the cpu preset (committed)"; cat "$sweep"; fi
# the methods this run was asked for (METHODS empty: every default method), each checked against the committed run
methods=$($PYTHON -c "import sys; from src.evaluation import parse_methods; from src.layout import METHODS
print(','.join(parse_methods(sys.argv[1]) if sys.argv[1] else METHODS))" "$METHODS")
echo
# retrained seed 0 first (the paper's methods on this repository's machine, MoA's routers with the current preset),
# then the committed run (every method): each method is checked against the first that has it
committed=(--committed "$committed_root/results/$slug")
retrained="$committed_root/results/$slug/retrained-seed0"
[ -d "$retrained" ] && committed=(--committed "$retrained" "${committed[@]}")
$PYTHON -m src.reproduction "${committed[@]}" --run "$out" --methods "$methods"
