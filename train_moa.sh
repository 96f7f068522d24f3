#!/usr/bin/env bash
# Train the MoA routers for the paper's 5-task and 7-task sets in one pass (the router features of a prompt depend
# only on its gold adapter, so both sets share them): MODEL, PRESET, DATA from the environment.
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
$PYTHON train_moa.py --tasks "$(task_set FIVE_TASKS)" --tasks "$(task_set SEVEN_TASKS)" --model "$MODEL" \
    --preset "$PRESET" --data "$DATA" "$@"
