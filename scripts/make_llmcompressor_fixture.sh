#!/usr/bin/env bash
# Remake tests/fixtures/llmcompressor/: a tiny random Bamba quantized by llm-compressor
# (FP8_DYNAMIC, W4A16, W8A16, W4A16_ASYM, and W4A16 by GPTQ), a tiny random Granite 4.0 MoE
# hybrid (W4A16, FP8_DYNAMIC), and the logits transformers gives for each.
# llm-compressor pins transformers and compressed-tensors versions of its own, so it gets a
# virtual environment of its own (torch 2.13.0 CPU installed first, then held by a constraint);
# the logits are recorded with the project's interpreter (transformers + compressed-tensors).
# Usage: scripts/make_llmcompressor_fixture.sh [VENV_DIR [NAME...]]
#   VENV_DIR        default ~/.cache/bamba/llmcompressor-venv
#   NAME...         quantize these fixtures alone (e.g. w4a16_asym); all are recorded again
#   BAMBA_PYTHON    the project's interpreter, default ./.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${HOME}/.cache/bamba/llmcompressor-venv}"
only=("${@:2}")
project_python="${BAMBA_PYTHON:-.venv/bin/python}"
out=tests/fixtures/llmcompressor

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" \
    "llmcompressor==0.14.0.1"

mkdir -p "$out"
"$venv/bin/python" scripts/llmcompressor_fixture.py quantize "$out" "${only[@]}"
"$project_python" scripts/llmcompressor_fixture.py record "$out"
du -sh "$out"/*/
