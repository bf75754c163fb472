#!/usr/bin/env bash
# Install bamba with its test extras and run the test suite (slow-marked tests are skipped;
# pass -m slow to run only those). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "test,serve,data,eval"
.venv/bin/python -m pytest -q "$@"
