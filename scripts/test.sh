#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then runs the whole CPU suite
# (references, Triton kernels under TRITON_INTERPRET=1, the C++ extension, the nvcc compile check of
# csrc/cuda for sm_80 and sm_90, algorithms on tiny random BERTs, CLI smoke tests).
# Extra arguments go to pytest, e.g. scripts/test.sh -k masked_linear
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export TRITON_INTERPRET=1
python -m sparsebert info
exec python -m pytest -q "$@"
