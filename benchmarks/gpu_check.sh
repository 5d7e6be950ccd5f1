#!/usr/bin/env bash
# GPU check of ctm_kernels, one script, under 8 minutes on one H200:
#   1. builds the compiled ops in place (CPU + CUDA Jacobi), at most 4 minutes;
#   2. runs the gpu tests (tests/test_gpu.py, tests/test_csrc.py);
#   3. runs the kernel benchmark (benchmarks/bench_kernels.py --device cuda);
#   4. runs the layer benchmark (benchmarks/bench_layer.py --device cuda --quick).
# Each step has its own time limit and a failed step does not stop the others; the exit
# status is non-zero if any step failed. Results go to the folder given as the first
# argument, else $OUT, else benchmarks/results/gpu:
#   gpu_check.log (everything printed), summary.txt (one line per step),
#   tests.xml (JUnit), kernels.json, layer.json, env.txt
#
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]
#   PYTHON=python3.12 bash benchmarks/gpu_check.sh     # another interpreter
#   SKIP_BUILD=1 ...                                   # use an extension already built
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
OUTDIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step NAME SECONDS CMD...
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local line
  line="$(printf '%-8s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$*")"
  [ "$rc" -eq 124 ] && line="$line  (timed out)"
  echo "$line" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
  return 0
}

{
  date -u +%FT%TZ
  nvidia-smi -L 2>&1 || echo "nvidia-smi not found"
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
} >"$OUTDIR/env.txt"
cat "$OUTDIR/env.txt" >>"$LOG"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  # in place, against the torch of $PY; ninja and all cores when available
  step build 240 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    "$PY" setup.py build_ext --inplace
fi
step tests 150 "$PY" -m pytest -q -m "gpu or not interpret" tests/test_gpu.py tests/test_csrc.py \
  -p no:cacheprovider --junitxml="$OUTDIR/tests.xml"
step kernels 150 "$PY" benchmarks/bench_kernels.py --device cuda --out "$OUTDIR/kernels.json"
step layer 120 "$PY" benchmarks/bench_layer.py --device cuda --quick --no-mem --out "$OUTDIR/layer.json"

echo "results in $OUTDIR" | tee -a "$SUMMARY"
exit "$failed"
