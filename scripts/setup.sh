#!/usr/bin/env bash
# Set up a fresh machine for qkmonitor: a virtual environment in .venv with pinned versions
# (constraints.txt; torch 2.13.0 is the CPU wheel on local disk, never an unpinned CUDA build)
# and, when run as root, Debian's Chromium for the Space's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# DeepSpeed (the ZeRO-3 tests) ships only as an sdist: build it first, against the torch above
# (no build isolation, so pip cannot fetch a CUDA torch into a build environment) and without
# its CUDA ops; the install below then finds it already there
.venv/bin/pip install -q torch==2.13.0 setuptools wheel -c constraints.txt
DS_BUILD_OPS=0 .venv/bin/pip install -q --no-build-isolation deepspeed -c constraints.txt
.venv/bin/pip install -q torch==2.13.0 -e ".[dev,space]" -c constraints.txt
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: chromium unavailable; the browser test will be skipped"
fi
