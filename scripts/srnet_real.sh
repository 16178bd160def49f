#!/usr/bin/env bash
# The SRNet real-data study on the MiniLM backbone (all-MiniLM-L6-v2 from PyPI), sized for a CPU:
# MNLI -> HANS-style, and PAWS-QQP with a controlled overlap bias (stage pawsqqp, ~1 h of one core).
# One process, one thread; re-running skips finished runs and resumes interrupted ones.
#   bash scripts/srnet_real.sh run [STAGE ...]   # stages in priority order: teacher main cecontrol highsparsity paradigms pawsqqp longmask
#   bash scripts/srnet_real.sh report            # tables, intervals and pictures into results/srnet
# The scale and the recipe are in scripts/srnet_eval.py (MNLI, PAWS); results/srnet/README.md says what ran.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate   # made by scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SPARSEBERT_BACKEND=${SPARSEBERT_BACKEND:-torch}   # plain-torch ops: the reference every backend is tested against
OUT=${OUT:-runs/srnet_cpu_v4}

cmd=${1:-run}
shift || true
case "$cmd" in
  run)    if [ $# -gt 0 ]; then python scripts/srnet_eval.py run --out "$OUT" --stage "$@"
          else python scripts/srnet_eval.py run --out "$OUT"; fi ;;
  report) python scripts/srnet_eval.py report --out "$OUT" --report-dir results/srnet ;;
  *) echo "usage: bash scripts/srnet_real.sh run [teacher|main|cecontrol|highsparsity|paradigms|pawsqqp|longmask ...] | report" >&2; exit 2 ;;
esac
