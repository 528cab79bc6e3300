#!/usr/bin/env bash
# Set up a fresh machine for qkmonitor: a virtual environment in .venv with pinned versions
# (constraints.txt; torch 2.13.0 is the CPU wheel on local disk, never an unpinned CUDA build)
# and, when run as root, Debian's Chromium for the Space's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0 -e ".[dev,space]" -c constraints.txt
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: chromium unavailable; the browser test will be skipped"
fi
