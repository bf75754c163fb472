#!/usr/bin/env bash
# Install bamba into ./.venv, then run the offline demo: train a byte-level BPE tokenizer on the
# Python standard library's source, tokenize it, train the tiny hybrid for a few minutes on the
# CPU, export an HF-layout checkpoint and complete a Python prompt with it. Extra arguments go to
# `bamba demo` (e.g. --dir runs/demo, --prompt "import os", --set steps=300). A second run skips
# the stages already done; afterwards `bamba generate` without --model uses the trained model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh demo
.venv/bin/bamba demo "$@"
