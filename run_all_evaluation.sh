#!/usr/bin/env bash
# Evaluate every method on the 7-task and the 5-task sets: MODEL, PRESET, DATA from the environment.
# The 7-task set runs first; the 5-task run reuses its base and single results (same settings, same adapters).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
for set in SEVEN_TASKS FIVE_TASKS; do
    $PYTHON full_evaluation.py --tasks "$(task_set $set)" --model "$MODEL" --preset "$PRESET" --data "$DATA" "$@"
done
