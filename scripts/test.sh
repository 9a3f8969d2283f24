#!/usr/bin/env bash
# The test command (README, `make test`, CI): lint and format check, then every test not marked slow or gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
scripts/wheel_check.sh  # the built wheel installs into a fresh venv and imports (20-40 s)
.venv/bin/mypy rlstack
# pytest exits 5 when it collects nothing; set -e turns that into a failure too.
.venv/bin/python -m pytest -m "not slow and not gpu" "$@"
