#!/usr/bin/env bash
# Train the MoA routers for the paper's 5-task and 7-task sets: MODEL, PRESET, DATA from the environment.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-smollm2-135m}
PRESET=${PRESET:-cpu}
DATA=${DATA:-local}
PYTHON=${PYTHON:-python}
for set in FIVE_TASKS SEVEN_TASKS; do
    tasks=$($PYTHON -c "from src.tasks import $set; print(','.join($set))")
    $PYTHON train_moa.py --tasks "$tasks" --model "$MODEL" --preset "$PRESET" --data "$DATA" "$@"
done
