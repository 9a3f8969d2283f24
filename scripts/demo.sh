#!/usr/bin/env bash
# The demo command (README, `make demo`): supervised warm start, then MIS-PO RL, on the tiny Step3p5 MoE.
# Prints held-out accuracy (greedy and sampled) before and after RL. CONFIG=configs/puzzle.yaml for the
# puzzle task, CONFIG=configs/tool.yaml for tool use (sets up its sandbox); extra arguments are config overrides, e.g. scripts/demo.sh trainer.steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-ERROR}"
config="${CONFIG:-configs/demo.yaml}"
run_dir=$(.venv/bin/rlstack config "$config" "$@" | sed -n 's/^  run_dir: //p')
start=$(date +%s)
# a config whose tools or rewards run model code needs the sandbox it names (the tool demo: bubblewrap)
backend=$(.venv/bin/rlstack config "$config" "$@" | sed -n '/^sandbox:/,/^[a-z]/s/^  backend: //p')
if .venv/bin/rlstack config "$config" "$@" | grep -q '^env:$'; then
  .venv/bin/rlstack sandbox setup --backend "$([ "$backend" = bubblewrap ] && echo bubblewrap || echo all)"
fi
.venv/bin/rlstack sft "$config" "$@"
.venv/bin/rlstack train "$config" "model.path=$run_dir/sft" "$@"
echo "demo finished in $(( $(date +%s) - start )) s; run directory: $run_dir"
