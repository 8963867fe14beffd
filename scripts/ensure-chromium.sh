#!/usr/bin/env bash
# scripts/ensure-chromium.sh: install Debian's headless chromium for the browser test, if missing.
# Silent when chromium is already there; apt-get as root, or through sudo; otherwise it says what
# to install and lets the tests run (the browser test then fails with the same advice).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi

advice="the browser test (tests/service/test_browser.py) needs Debian's chromium: run
  sudo apt-get install -y chromium
(or put a chromium or chromium-browser on PATH), then run make test again."

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: chromium is missing and this system has no apt-get; $advice" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root=""
elif command -v sudo >/dev/null 2>&1; then
  as_root="sudo"
else
  echo "ensure-chromium: chromium is missing, and installing it needs root or sudo; $advice" >&2
  exit 0
fi

echo "ensure-chromium: installing chromium (apt-get) for the browser test" >&2
if ! { $as_root apt-get update -qq \
       && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null; then
  echo "ensure-chromium: apt-get could not install chromium (see above); $advice" >&2
fi
