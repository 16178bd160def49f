#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then runs the whole CPU suite
# (references, Triton kernels under TRITON_INTERPRET=1, the C++ extension, the nvcc compile check of
# csrc/cuda for sm_80 and sm_90, algorithms on tiny random BERTs, CLI smoke tests, the GPU suite's dry
# run), then the Triton kernel tests again under triton 3.6, the GPU machine's version, from a second
# cached venv (scripts/setup_triton36.sh).
# Extra arguments go to pytest, e.g. scripts/test.sh -k masked_linear; with them the triton 3.6 pass is
# skipped unless SPARSEBERT_TRITON36=1 (SPARSEBERT_TRITON36=0 skips it always).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export TRITON_INTERPRET=1
python -m sparsebert info
status=0
python -m pytest -q "$@" || status=$?
if [ "${SPARSEBERT_TRITON36:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = "1" ]; then
  echo "== Triton kernel tests under triton 3.6 (.venv-triton36)"
  bash scripts/setup_triton36.sh
  kernel_tests=(tests/test_triton_kernels.py tests/test_pruned_kernels.py tests/test_sparse_format_kernels.py)
  for f in tests/test_gpu_*.py; do [ -e "$f" ] && [ "$f" != tests/test_gpu_suite_dryrun.py ] && kernel_tests+=("$f"); done
  .venv-triton36/bin/python -c "import triton; print('triton', triton.__version__, triton.__file__)"
  .venv-triton36/bin/python -m pytest -q -p no:cacheprovider "${kernel_tests[@]}" || status=$?
fi
exit "$status"
