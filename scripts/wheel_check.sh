#!/usr/bin/env bash
# Packaging check (CI runs it from scripts/test.sh): builds rlstack's wheel from the working tree,
# installs it with its base dependencies, resolved under constraints/cpu.txt, into a fresh virtual
# environment outside the repo, then from outside the repo imports rlstack, runs the `rlstack` console
# script and checks the package data and entry points. It catches what the editable install in .venv
# hides: a module or data file left out of the wheel, a dependency that nothing in pyproject.toml brings
# in, a broken entry point. Usage: scripts/wheel_check.sh   (in a git checkout, after scripts/setup.sh,
# which installs uv into .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
repo=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
quiet() { grep -v "is neither a file nor a directory" || true; }

# Build from a copy of what git would commit (tracked files and untracked ones it does not ignore):
# building in the repo would leave build/ and *.egg-info there, and a stale build/lib can carry deleted
# modules into the wheel. An isolated build, with the newest setuptools, as `pip install rlstack` does.
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -e "$f" ]; then printf '%s\0' "$f"; fi
done | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
.venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$tmp/dist" "$tmp/src" 2>&1 | quiet
wheel=$(echo "$tmp"/dist/rlstack-*.whl)

# A fresh environment on the Python .venv was made with. uv installs into it in 5-30 s (pip: 60-140 s,
# most of it byte-compiling torch), hard-linking from its cache (~/.cache/uv, 1.6 GB: a cache inside $tmp
# would double the files that the clean-up deletes: 30 s more), from the sources setup.sh installed from
# (scripts/uv_sources.sh; the constraint torch==2.13.0+cpu matches only the CPU build, so a CUDA build can
# never come in).
"$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv --without-pip "$tmp/venv"
source scripts/uv_sources.sh
export UV_NO_PROGRESS=1
.venv/bin/uv pip install --quiet --python "$tmp/venv/bin/python" -c constraints/cpu.txt "${uv_sources[@]}" "$wheel"
.venv/bin/uv pip check --quiet --python "$tmp/venv/bin/python"

cd "$tmp"  # away from the repo, so that `import rlstack` cannot find the source tree
unset PYTHONPATH
PYTHONNOUSERSITE=1 "$tmp/venv/bin/rlstack" --help >/dev/null
PYTHONNOUSERSITE=1 "$tmp/venv/bin/python" - "$tmp/venv" "$repo" <<'EOF'
import importlib.metadata as md
import importlib.resources
import pathlib
import sys

venv, repo = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()
import rlstack
import rlstack.cli
import rlstack.model

where = pathlib.Path(rlstack.__file__).resolve()
assert where.is_relative_to(venv), f"rlstack imported from {where}, not from the fresh venv {venv}"
assert pathlib.Path(rlstack.model.__file__).resolve().is_relative_to(venv), rlstack.model.__file__
root = importlib.resources.files("rlstack")
assert root.joinpath("py.typed").is_file(), "rlstack/py.typed is not in the wheel"
templates = root.joinpath("rewards/templates")
shipped = sorted(p.name for p in templates.iterdir() if p.name.endswith(".txt")) if templates.is_dir() else []
wanted = sorted(p.name for p in (repo / "rlstack/rewards/templates").glob("*.txt"))
assert wanted and shipped == wanted, f"reward templates: the wheel has {shipped}, the source {wanted}"
assets = root.joinpath("monitor/report/assets")
shipped_assets = sorted(p.name for p in assets.iterdir()) if assets.is_dir() else []
wanted_assets = sorted(p.name for p in (repo / "rlstack/monitor/report/assets").iterdir())
assert shipped_assets == wanted_assets, f"report assets: the wheel has {shipped_assets}, the source {wanted_assets}"
dist = md.distribution("rlstack")
assert dist.version == rlstack.__version__, (dist.version, rlstack.__version__)
groups = {(e.group, e.name): e.value for e in dist.entry_points}
assert groups.get(("console_scripts", "rlstack")) == "rlstack.cli:main", groups
assert groups.get(("vllm.general_plugins", "rlstack")) == "rlstack.rollout.vllm_plugin:register", groups
print(f"wheel check: rlstack {dist.version}, installed from its wheel into a fresh venv: imports, "
      f"`rlstack --help`, py.typed, {len(shipped)} reward templates, {len(shipped_assets)} report assets and "
      "entry points ok")
EOF
echo "wheel check passed in $(( $(date +%s) - start )) s"
