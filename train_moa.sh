#!/usr/bin/env bash
# Train the MoA routers for the paper's 5-task and 7-task sets: MODEL, PRESET, DATA from the environment.
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
for set in FIVE_TASKS SEVEN_TASKS; do
    $PYTHON train_moa.py --tasks "$(task_set $set)" --model "$MODEL" --preset "$PRESET" --data "$DATA" "$@"
done
