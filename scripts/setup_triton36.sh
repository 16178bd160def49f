#!/usr/bin/env bash
# A second venv, .venv-triton36, for running the Triton interpreter tests with triton 3.6 (the GPU
# machine's version) besides the main venv's newer triton. It holds triton==3.6.* and numpy<2; the rest
# (the same CPU torch, sparsebert and its extension, pytest) comes from .venv through a .pth line that adds
# .venv's site-packages AFTER its own, so `import triton` finds 3.6 first. Idempotent (stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_PIN=${SPARSEBERT_TRITON_OLD:-triton==3.6.*}
# triton 3.6's interpreter relies on NumPy 1 behaviour: int() of a 1-element array (an error from NumPy 2.4:
# "only 0-dimensional arrays can be converted to Python scalars" at `range(0, K, BLOCK_K)`) and ~x on
# uint32 through a Python -1 (NumPy 2: "Python integer -1 out of bounds for uint32"): pin NumPy 1.
NUMPY_PIN=${SPARSEBERT_TRITON_OLD_NUMPY:-numpy<2}
if [ ! -f .venv/.sparsebert-setup ]; then
  echo "[setup_triton36] .venv is not set up: run scripts/setup.sh first" >&2
  exit 2
fi
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
py=$(.venv/bin/python -c "import sys; print(sys.executable)")
stamp=.venv-triton36/.sparsebert-setup
want="$TRITON_PIN $NUMPY_PIN $(cat .venv/.sparsebert-setup) $main_site"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup_triton36] creating .venv-triton36 with $TRITON_PIN" >&2
rm -rf .venv-triton36
"$py" -m venv --without-pip .venv-triton36
site=$(.venv-triton36/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -m pip install -q --no-deps --target "$site" "$TRITON_PIN" "$NUMPY_PIN"
# addsitedir (not a bare path) so .venv's own .pth files (the editable sparsebert install) are processed too
echo "import site; site.addsitedir('$main_site')" > "$site/zz_sparsebert_main_venv.pth"
.venv-triton36/bin/python - "$TRITON_PIN" <<'PY'
import sys, triton, torch
want = sys.argv[1].split("==")[1].rstrip(".*")
assert triton.__version__.startswith(want), f"triton {triton.__version__} imported, wanted {want}: {triton.__file__}"
import sparsebert.kernels  # noqa: F401
print(f"[setup_triton36] triton {triton.__version__} ({triton.__file__}), torch {torch.__version__}")
PY
echo "$want" > "$stamp"
