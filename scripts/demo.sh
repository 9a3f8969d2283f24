#!/usr/bin/env bash
# The demo command (README, `make demo`). Until the RL trainer lands (issue 6) it runs the model smoke
# check end to end: resolve the demo config, build the tiny Step3p5 MoE, serve it with vLLM, and show
# that vLLM and PyTorch agree on the sampled tokens' log-probs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
run_dir="${RUN_DIR:-runs/demo}"
.venv/bin/rlstack config configs/demo.yaml --out "$run_dir"
VLLM_LOGGING_LEVEL=ERROR .venv/bin/rlstack model check --prompts 64 --tokens 32 2> "$run_dir/model_check.log" || {
  tail -n 30 "$run_dir/model_check.log"; exit 1; }
