#!/usr/bin/env bash
# What `make gpu-check` runs on a GPU machine: builds torchpool with its CUDA kernels, runs the
# whole test suite (it runs on cuda when a GPU is present), then the benchmark suite on cuda.
# Everything goes to the terminal and to a log: $OUT/gpu-check.log when OUT is set (benchmark
# results then go to $OUT/benchmarks), else build/gpu-check.log. Ends with a summary: date, GPU,
# torch / CUDA versions, the csrc tree hash and the pytest summary line.
#
# Environment: PYTHON (default python3), PYTEST_ARGS (extra pytest arguments), PYTEST_WORKERS
# (test processes when pytest-xdist is installed, default 8; 0 runs the tests in one process),
# BENCH_ARGS (extra benchmark arguments), SKIP_BENCH=1 (tests only), SKIP_BUILD=1 (use the build
# already installed).
# Exit status: non-zero when the build, an import check or a test failed (the benchmark's own
# failures are reported in the log but do not change it).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-python3}"
if [ -n "${OUT:-}" ]; then
  LOG="$OUT/gpu-check.log"
  BENCH_OUT="$OUT/benchmarks"
else
  LOG="$ROOT/build/gpu-check.log"
  BENCH_OUT=""
fi
mkdir -p "$(dirname "$LOG")"
PYTEST_LOG="$(mktemp "${TMPDIR:-/tmp}/torchpool-pytest.XXXXXX")"
trap 'rm -f "$PYTEST_LOG"' EXIT

step() { printf '\n=== %s ===\n' "$*"; }

main() {
  local status=0 built=0
  step "environment"
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  nvidia-smi || echo "nvidia-smi failed"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

  "$PYTHON" -c 'import pytest, hypothesis' 2>/dev/null \
    || echo "gpu-check: pytest and hypothesis are needed for the tests (pip install pytest hypothesis numpy)"

  # Build for the GPU present unless TORCH_CUDA_ARCH_LIST says otherwise (half the compile time
  # of the default sm_80 + sm_90).
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST || unset TORCH_CUDA_ARCH_LIST
  fi
  step "build (TORCHPOOL_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-setup.py default})"
  local start=$SECONDS
  if [ "${SKIP_BUILD:-0}" = "1" ]; then
    echo "gpu-check: SKIP_BUILD=1: using the installed build"
    built=1
  elif TORCHPOOL_CUDA=1 "$PYTHON" -m pip install -e . --no-build-isolation --no-deps; then
    echo "gpu-check: built in $((SECONDS - start))s"
    built=1
  else
    echo "gpu-check: build failed"
    status=1
  fi

  if [ "$built" -eq 1 ]; then
    step "import check"
    if ! "$PYTHON" - <<'PY'
import torch, torchpool
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert torchpool.cuda_built(), "torchpool was built without its CUDA kernels"
x = torch.randn(2, 3, 8, 8, device="cuda")
y = torchpool.functional.max_pool2d(x, 2)
torch.testing.assert_close(y, torch.nn.functional.max_pool2d(x, 2), rtol=0, atol=0)
print("torchpool CUDA kernels load and run on", torch.cuda.get_device_name())
PY
    then
      echo "gpu-check: import check failed"
      status=1
    fi

    step "tests"
    local workers=()
    if [ "${PYTEST_WORKERS:-8}" != "0" ] && "$PYTHON" -c 'import xdist' 2>/dev/null; then
      workers=(-n "${PYTEST_WORKERS:-8}")
    fi
    echo "gpu-check: pytest ${workers[*]:-(one process)}"
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest tests -q "${workers[@]}" ${PYTEST_ARGS:-} 2>&1 | tee "$PYTEST_LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1

    if [ "${SKIP_BENCH:-0}" != "1" ]; then
      step "benchmarks"
      if [ -f benchmarks/run.py ]; then
        local args=(--device cuda)
        [ -n "$BENCH_OUT" ] && args+=(--out "$BENCH_OUT")
        # shellcheck disable=SC2086
        "$PYTHON" -m benchmarks.run "${args[@]}" ${BENCH_ARGS:-} || echo "gpu-check: the benchmark run failed (exit $?)"
      else
        echo "gpu-check: benchmarks/run.py not found: no benchmark run"
      fi
    fi
  fi

  step "summary"
  echo "date:        $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "gpu:         $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo unknown)"
  echo "torch:       $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo unknown)"
  echo "cuda:        $("$PYTHON" -c 'import torch; print(torch.version.cuda)' 2>/dev/null || echo unknown)"
  local tree dirty=""
  tree="$(git rev-parse HEAD:csrc 2>/dev/null || echo unknown)"
  if [ "$tree" != unknown ] && [ -n "$(git status --porcelain -- csrc 2>/dev/null)" ]; then
    dirty=" (csrc differs from HEAD: the tested sources are not this tree)"
  fi
  echo "csrc tree:   $tree$dirty"
  echo "pytest:      $(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$PYTEST_LOG" | tail -n 1 || true)"
  echo "status:      $([ "$status" -eq 0 ] && echo ok || echo FAILED)"
  echo "log:         $LOG"
  return "$status"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
