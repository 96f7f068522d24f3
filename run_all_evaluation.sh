#!/usr/bin/env bash
# Evaluate every method on the 7-task and the 5-task sets: MODEL, PRESET, DATA and METHODS (a --methods list, e.g.
# paper; empty: every default method) from the environment; extra flags pass through.
# The 7-task set runs first and computes everything (not the committed base and single results: a reproduction);
# the 5-task run reuses its base and single results (same settings, same adapters).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
for set in SEVEN_TASKS FIVE_TASKS; do
    reuse=$([ "$set" = SEVEN_TASKS ] && echo --no-reuse || true)
    $PYTHON full_evaluation.py --tasks "$(task_set $set)" --model "$MODEL" --preset "$PRESET" --data "$DATA" \
        ${METHODS:+--methods "$METHODS"} $reuse "$@"
done
