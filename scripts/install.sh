#!/usr/bin/env bash
# Create ./.venv if needed and install bamba into it, editable, with the given extras.
# torch is installed first, pinned to the CPU build 2.13.0: an unpinned torch would pull a
# multi-GB CUDA build. Usage: scripts/install.sh [extras, e.g. "test,data"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
else
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
fi
