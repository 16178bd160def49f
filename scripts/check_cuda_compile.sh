#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with the installed nvcc for each architecture (default sm_80 and sm_90),
# torch-free, object files only (-c), warnings as errors, with ptxas statistics. Exits non-zero on any
# compile error.
# Usage: scripts/check_cuda_compile.sh [ARCH ...]      e.g. scripts/check_cuda_compile.sh 80 90a
# Env:   NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), NVCC_FLAGS (extra flags),
#        JOBS (parallel compiles, default: number of CPUs), VERBOSE=1 (print the full ptxas report:
#        registers, spills and shared memory of every kernel).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi
ARCHS=("$@")
[[ ${#ARCHS[@]} -eq 0 ]] && ARCHS=(80 90)
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT

compile() {  # compile SRC ARCH: writes $OUT_DIR/NAME.sm_ARCH.{o,log,rc}
  local src="$1" arch="$2" name
  name="$(basename "$src" .cu).sm_$arch"
  # shellcheck disable=SC2086
  "$NVCC" -std=c++17 -O3 -lineinfo -Xptxas -v -Werror all-warnings -gencode "arch=compute_$arch,code=sm_$arch" \
    -I"$ROOT/csrc/cuda" ${NVCC_FLAGS:-} -c "$src" -o "$OUT_DIR/$name.o" >"$OUT_DIR/$name.log" 2>&1
  echo $? >"$OUT_DIR/$name.rc"
}

echo "nvcc $("$NVCC" --version | grep -o 'release [0-9.]*'), archs: ${ARCHS[*]}, jobs: $JOBS"
shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu found" >&2
  exit 2
fi
for src in "${sources[@]}"; do
  for arch in "${ARCHS[@]}"; do
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n; done
    compile "$src" "$arch" &
  done
done
wait

failures=0
for src in "${sources[@]}"; do
  for arch in "${ARCHS[@]}"; do
    name="$(basename "$src" .cu).sm_$arch"
    log="$OUT_DIR/$name.log"
    if [[ "$(cat "$OUT_DIR/$name.rc" 2>/dev/null)" == "0" ]]; then
      kernels=$(grep -c 'Compiling entry function' "$log")
      spills=$(grep -c -E '[1-9][0-9]* bytes spill (stores|loads)' "$log")
      echo "ok    $(basename "$src") sm_$arch  ($kernels kernels, $spills with register spills)"
      [[ "${VERBOSE:-0}" == "1" ]] && cat "$log"
    else
      echo "FAIL  $(basename "$src") sm_$arch"
      cat "$log"
      failures=$((failures + 1))
    fi
  done
done
if [[ $failures -ne 0 ]]; then
  echo "check_cuda_compile: $failures compile(s) failed" >&2
  exit 1
fi
echo "check_cuda_compile: all CUDA sources compile"
