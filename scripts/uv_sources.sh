# Sourced by scripts/setup.sh and scripts/wheel_check.sh (from the repo root, after .venv exists): sets
# `uv_sources`, pip's package sources as `uv pip install` arguments. uv reads no pip configuration, so it
# is given pip's find-links (where torch's CPU build may lie) and extra indexes, and considers every index
# as pip does (uv's default takes a package only from the first index that has it).
uv_sources=(--index-strategy unsafe-best-match)
for l in ${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}; do
  uv_sources+=(--find-links "$l")
done
for i in ${PIP_EXTRA_INDEX_URL:-$(.venv/bin/python -m pip config get global.extra-index-url 2>/dev/null || true)}; do
  uv_sources+=(--extra-index-url "$i")
done
