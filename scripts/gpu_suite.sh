#!/usr/bin/env bash
# The GPU suite in one command, self-timed to fit a device call's 600 s limit (see bench/gpu_suite.py):
#   bash scripts/gpu_suite.sh                 on the GPU machine: build (sm_90a), GPU tests, benchmarks
#   bash scripts/gpu_suite.sh --dry-run       on a CPU: the same pipeline, interpreter and tiny shapes
# Results: --out DIR, else $OUT, else bench/results/suite-<stamp>; always also bench/results/<gpu>-<date>-<sha>.*
# Wheels in .whl/ (scripts/gpu_wheels.sh fetches them here) are installed into /tmp/site first.
# Uses python3 (the image's torch/triton); on a CPU checkout with .venv/ and no torch in python3, the venv's.
set -uo pipefail
export SPARSEBERT_SUITE_START="${SPARSEBERT_SUITE_START:-$(date +%s.%N)}"  # the wheels' time counts too
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null \
    && [ -x .venv/bin/python ]; then  # find_spec: no 3 s torch import just to choose the interpreter
  PY=.venv/bin/python
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu_suite] installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_suite] wheel install failed; continuing without them" >&2
  fi
fi
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# bench/gpu_suite.py links sparsebert/kernels -> ../kernels when there is no install
exec "$PY" bench/gpu_suite.py "$@"
