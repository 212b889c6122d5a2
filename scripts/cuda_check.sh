#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: needs nvcc and torch's headers, not a GPU or a CUDA
# build of torch. Every csrc/cuda/*.cu is compiled with `nvcc -c` for sm_90 (CUDA_CHECK_ARCHS,
# e.g. "80 90", overrides) with the flags the extension build uses; the one generated header a
# CPU wheel of torch lacks (c10/cuda/impl/cuda_cmake_macros.h) is provided in a temporary
# include dir. Exits non-zero when any file fails to compile.
#
# Environment: PYTHON (default python3), NVCC (default nvcc), CUDA_CHECK_JOBS (parallel
# compiles, default 2), CUDA_CHECK_ARCHS, CUDA_CHECK_STD (default c++20), CUDA_CHECK_FLAGS
# (extra nvcc flags).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"
JOBS="${CUDA_CHECK_JOBS:-2}"
ARCHS="${CUDA_CHECK_ARCHS:-90}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda-check: nvcc not found (set NVCC or add the CUDA toolkit to PATH)" >&2
  exit 1
fi

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "cuda-check: no csrc/cuda/*.cu files" >&2
  exit 1
fi

# Torch's include dirs and the Python headers (torch's headers may include Python.h).
mapfile -t INCLUDES < <("$PYTHON" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
PY
)

TMP="$(mktemp -d "${TMPDIR:-/tmp}/torchpool-cuda-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/include/c10/cuda/impl" "$TMP/obj" "$TMP/log"
if ! [ -f "${INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$TMP/include/c10/cuda/impl/cuda_cmake_macros.h"
fi

# The stable ABI version setup.py builds against (torch's own where its BuildExtension sets one).
LIMITED_API="$("$PYTHON" -c 'from torch.utils import cpp_extension as c; print(getattr(c, "min_supported_cpython", "0x03090000"))')"

FLAGS=(-c "-std=${CUDA_CHECK_STD:-c++20}" -O3 -lineinfo --expt-relaxed-constexpr -Xcompiler -fPIC
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "-DPy_LIMITED_API=$LIMITED_API"
       -DTORCHPOOL_WITH_CUDA
       -I "$TMP/include" -I "$ROOT/csrc")
for inc in "${INCLUDES[@]}"; do FLAGS+=(-I "$inc"); done
for arch in $ARCHS; do FLAGS+=(-gencode "arch=compute_${arch},code=sm_${arch}"); done
# shellcheck disable=SC2206
FLAGS+=(${CUDA_CHECK_FLAGS:-})

echo "cuda-check: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "cuda-check: torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), archs: sm_${ARCHS// /, sm_}"

compile() {  # compile SRC: writes $TMP/log/NAME.log and $TMP/log/NAME.rc
  local src="$1" name
  name="$(basename "$src" .cu)"
  local start=$SECONDS rc=0
  "$NVCC" "${FLAGS[@]}" "$src" -o "$TMP/obj/$name.o" >"$TMP/log/$name.log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - start))" > "$TMP/log/$name.rc"
}

running=0
for src in "${SOURCES[@]}"; do
  compile "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

failed=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  read -r rc secs < "$TMP/log/$name.rc" || { rc=1; secs=?; }
  if [ "$rc" -eq 0 ]; then
    echo "cuda-check: ok      csrc/cuda/$name.cu (${secs}s)"
  else
    echo "cuda-check: FAILED  csrc/cuda/$name.cu (exit $rc)"
    failed=1
  fi
  # Compiler output (warnings or errors) is always shown.
  if [ -s "$TMP/log/$name.log" ]; then sed 's/^/    /' "$TMP/log/$name.log"; fi
done

if [ "$failed" -ne 0 ]; then
  echo "cuda-check: failed" >&2
  exit 1
fi
echo "cuda-check: all ${#SOURCES[@]} CUDA sources compile"
