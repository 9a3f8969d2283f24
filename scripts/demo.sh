#!/usr/bin/env bash
# The demo command (README, `make demo`): supervised warm start, then MIS-PO RL, on the tiny Step3p5 MoE.
# Prints held-out accuracy (greedy and sampled) before and after RL. CONFIG=configs/puzzle.yaml for the
# puzzle task; extra arguments are config overrides, e.g. scripts/demo.sh trainer.steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-ERROR}"
config="${CONFIG:-configs/demo.yaml}"
run_dir=$(.venv/bin/rlstack config "$config" "$@" | sed -n 's/^  run_dir: //p')
start=$(date +%s)
.venv/bin/rlstack sft "$config" "$@"
.venv/bin/rlstack train "$config" "model.path=$run_dir/sft" "$@"
echo "demo finished in $(( $(date +%s) - start )) s; run directory: $run_dir"
