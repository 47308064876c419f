#!/usr/bin/env bash
# Make Debian's `chromium` available for the dashboard's browser test (tests/service/test_dashboard_browser.py;
# .ci/run calls this first).
#   bash scripts/ensure_chromium.sh      # prints the chromium path; exit 0 when it is usable
# Exit codes: 0 chromium is usable, 3 apt-get (or root) is not available here: install it by hand, other: install failed.
set -euo pipefail

find_chromium() {
  command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null || true
}

path="$(find_chromium)"
if [ -n "$path" ]; then
  echo "$path"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get is not available: install chromium by hand" >&2
  exit 3
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "not root and no password-less sudo: install chromium by hand" >&2
    exit 3
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent on a fresh machine; an install without them finds nothing.
if ! $SUDO apt-get install -y -q chromium >/tmp/ensure_chromium.log 2>&1; then
  $SUDO apt-get update -q >>/tmp/ensure_chromium.log 2>&1
  $SUDO apt-get install -y -q chromium >>/tmp/ensure_chromium.log 2>&1 || {
    tail -20 /tmp/ensure_chromium.log >&2
    exit 1
  }
fi
path="$(find_chromium)"
if [ -z "$path" ]; then
  echo "chromium was installed but is not on PATH" >&2
  exit 1
fi
echo "$path"
