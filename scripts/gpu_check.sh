#!/usr/bin/env bash
# The learner's GPU tests (tests/integration/test_learner_cuda.py: one DeepSpeed rank on cuda:0 over NCCL,
# ZeRO-2 and ZeRO-3) on a machine with a CUDA GPU whose python3 has torch, transformers, tokenizers,
# safetensors, numpy and pytest but may lack the rest. Run from anywhere; extra arguments go to pytest.
#
# Packages that machine lacks (deepspeed, pydantic and their needs) come as wheels in .whl/ at the repo
# root (git-ignored, made on a machine with PyPI access) and are installed into /tmp/site; torch never is.
# The log goes to $OUT/gpu_tests.log ($OUT defaults to /tmp/gpu_check). PYTHON overrides python3.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
py="${PYTHON:-python3}"
mkdir -p "$out"

site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing .whl/*.whl into /tmp/site failed" >&2; exit 1; }
    site=":/tmp/site"
fi
export PYTHONPATH="$PWD$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

nvidia-smi -L || echo "gpu_check: nvidia-smi failed"
"$py" - <<'EOF' 2>&1 | grep -v "^\[20" | tee "$out/versions.txt"
import platform

import deepspeed
import pydantic
import torch
import transformers

import rlstack.learner.worker  # noqa: F401  (the learner imports here, without Ray or vLLM)

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, pydantic {pydantic.VERSION}")
if torch.cuda.is_available():
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s), NCCL {nccl}")
else:
    print("GPU: none visible to torch")
EOF

"$py" -m pytest tests/integration/test_learner_cuda.py -m gpu -v -s -p no:cacheprovider --timeout=180 \
    --durations=0 "$@" 2>&1 | tee "$out/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "gpu_check: pytest exit status $status"
grep -E "^ZeRO-|(PASSED|FAILED|ERROR)( |$)|[0-9]+ (passed|failed)" "$out/gpu_tests.log" | tail -40
exit "$status"
