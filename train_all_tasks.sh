#!/usr/bin/env bash
# Train one LoRA per task for all seven tasks: MODEL, PRESET, DATA from the environment; extra flags pass through.
# With several GPUs, one task per GPU in parallel (waves of as many tasks as GPUs); else one process for all.
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
IFS=, read -r -a TASKS <<< "$(task_set SEVEN_TASKS)"
NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)

if [ "$NGPU" -gt 1 ]; then
    mkdir -p logs
    for ((i = 0; i < ${#TASKS[@]}; i += NGPU)); do
        pids=()
        for ((g = 0; g < NGPU && i + g < ${#TASKS[@]}; g++)); do
            task=${TASKS[i + g]}
            CUDA_VISIBLE_DEVICES=$g $PYTHON train_individual_loras.py --task "$task" --model "$MODEL" \
                --preset "$PRESET" --data "$DATA" "$@" > "logs/train_$task.log" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid"; done   # set -e stops at the first failed task
    done
else
    $PYTHON train_individual_loras.py --task all --model "$MODEL" --preset "$PRESET" --data "$DATA" "$@"
fi
