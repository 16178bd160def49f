#!/usr/bin/env bash
# The main job on its embedded default: sets itself up, then runs `sparsebert demo` (no arguments needed):
# dense vs SRNet subnetwork vs Kprune-pruned copy, accuracy, size and latency measured on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec sparsebert demo "$@"
