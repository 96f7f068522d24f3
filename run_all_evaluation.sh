#!/usr/bin/env bash
# Evaluate every method on the 7-task and the 5-task sets: MODEL, PRESET, DATA from the environment.
# The 7-task set runs first; the 5-task run reuses its base and single results (same settings, same adapters).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-smollm2-135m}
PRESET=${PRESET:-cpu}
DATA=${DATA:-local}
PYTHON=${PYTHON:-python}
for set in SEVEN_TASKS FIVE_TASKS; do
    tasks=$($PYTHON -c "from src.tasks import $set; print(','.join($set))")
    $PYTHON full_evaluation.py --tasks "$tasks" --model "$MODEL" --preset "$PRESET" --data "$DATA" "$@"
done
