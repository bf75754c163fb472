#!/usr/bin/env bash
# Install bamba and run the main job on the embedded default model (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/bamba generate --prompt "def fibonacci(n):" --max-new-tokens 48 "$@"
