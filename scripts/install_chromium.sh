#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium` package), which the tests drive over the DevTools protocol
# (rlstack/monitor/chromium.py). Idempotent: with a chromium already on PATH it only prints its version.
# Installing needs root (apt-get); `playwright install` cannot download browsers here.
set -euo pipefail

find_chromium() {
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
      command -v "$name"
      return 0
    fi
  done
  return 1
}

# Debian's wrapper script may complain on stderr (its /dev/shm check); the version is on stdout.
version() { "$1" --version 2>/dev/null || echo "$1 (version unknown)"; }

if bin="$(find_chromium)"; then
  version "$bin"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install_chromium.sh: no chromium on PATH; as root run: apt-get install -y --no-install-recommends chromium" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y --no-install-recommends -q chromium; }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! install 2>&1 | tee "$log"; then  # pipefail: the status of apt-get
  # no package lists yet (a fresh container): fetch them once and retry; any other failure is final
  if grep -qE "Unable to locate package|has no installation candidate" "$log"; then
    apt-get update -q
    install
  else
    exit 1
  fi
fi

bin="$(find_chromium)" || { echo "install_chromium.sh: chromium installed but not on PATH" >&2; exit 1; }
version "$bin"
