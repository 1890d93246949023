#!/usr/bin/env bash
# The GPU work, one phase per call of the lent machine. Every call starts a bare machine and
# may run 10 minutes, so each phase bounds its steps with timeouts and leaves its logs and
# results in $OUT (the device tool brings back 8 files at most, 2 folders deep).
#
#   tools/gpu_session.sh check                 # tests (GPU + compiled Triton), compute-sanitizer,
#                                              # then the headline kernel cases while time remains
#   tools/gpu_session.sh bench-kernels [EXPR]  # kernel suite (pytest -k EXPR, e.g. bfloat16)
#                                              # -> results JSON, plots, summary, dispatch table
#   tools/gpu_session.sh bench-e2e [EXPR]      # e2e variants (e.g. "dense-32L or 2:4-32L")
#   tools/gpu_session.sh tune [ARGS]           # Triton tile sweep (bench/tune_triton.py ARGS)
#
# Before the call, on the CPU machine: tools/prebuild_ext.sh (a slimstack._C for the image's
# Python 3.12 / torch 2.11 in .prebuilt/), and the nvidia-cutlass wheel in .whl/ for the
# fallback build (device tool README); carry [".prebuilt", ".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
START=$SECONDS
BUDGET=${GPU_SESSION_BUDGET:-570}  # seconds this call may use, under the 600-second limit

left() { echo $((BUDGET - (SECONDS - START))); }
log() { echo "[gpu_session $((SECONDS - START))s] $*" | tee -a "$OUT/session.log"; }
# run_for SECONDS CMD...: SIGINT at the limit, so pytest still writes what it has measured
run_for() {
  local limit=$1
  shift
  if [ "$limit" -le 10 ]; then log "skipped (no time left): $*"; return 124; fi
  timeout -s INT -k 20 "$limit" "$@"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

ext_has_cuda() { python3 -c "import torch, slimstack._C as c; assert c.with_cuda" 2>/dev/null; }

extension() {
  # editable install of the Python package; the native extension prebuilt or compiled here
  local suffix stamp
  suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  stamp=$(python3 tools/ext_stamp.py)
  if [ -f ".prebuilt/_C$suffix" ] && [ "$(cat .prebuilt/stamp 2>/dev/null)" = "$stamp" ]; then
    cp ".prebuilt/_C$suffix" "python/slimstack/_C$suffix"
    SLIMSTACK_BUILD_EXT=0 python3 -m pip install -q --no-build-isolation --no-deps -e . \
      >"$OUT/build.log" 2>&1
    if ext_has_cuda; then log "prebuilt slimstack._C loaded"; else rm -f "python/slimstack/_C$suffix"; fi
  else
    log "no prebuilt extension for this torch / these sources ($stamp)"
  fi
  if ! ext_has_cuda; then
    log "compiling slimstack._C for sm_90a"
    TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 SLIMSTACK_BUILD_CUDA=1 python3 -m pip install -q \
      --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
  fi
  python3 -m slimstack.cli info 2>&1 | tee -a "$OUT/session.log"
}

xdist() { python3 -c "import xdist" 2>/dev/null && echo "-n ${1} --dist loadfile"; }

kernel_bench() {  # kernel_bench SECONDS [-k EXPR]
  local limit=$1
  shift
  SLIMSTACK_BENCH_RESULTS="$OUT" run_for "$limit" python3 -m pytest -q bench/test_bench_kernels.py \
    --benchmark-only -p no:cacheprovider "$@" 2>&1 | tail -n 25
  for json in "$OUT"/*-kernels.json; do
    [ -f "$json" ] || continue
    python3 bench/plot.py "$json" >/dev/null || true
    python3 bench/summarize.py "$json" >"$OUT/summary.md" || true
    python3 -m slimstack.ops.tuning "$json" --write "$OUT/dispatch_table.json" || true
  done
}

case "${1:-}" in
  check)
    extension
    log "tests: everything but the slow ones, GPU-marked and compiled Triton included"
    # shellcheck disable=SC2046
    run_for $(( $(left) - 240 )) python3 -m pytest -q -m "not slow" -p no:cacheprovider \
      --maxfail=40 -rfE $(xdist 8) 2>&1 | tee "$OUT/tests.log" | tail -n 40
    log "compute-sanitizer memcheck on the small CUDA kernel tests"
    run_for 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x \
      -p no:cacheprovider tests/test_cuda_kernels.py -k small 2>&1 | tail -n 30 \
      | tee "$OUT/sanitizer.log"
    log "sanitizer exit: ${PIPESTATUS[0]}"
    log "headline kernel cases (bf16, Mistral-7B shapes, M = 1, 16, 2048)"
    kernel_bench $(( $(left) - 5 )) -k "bfloat16 and (4096x4096 or 14336x4096 or 4096x14336) and (M1- or M16- or M2048-)"
    ;;
  bench-kernels)
    extension
    kernel_bench $(( $(left) - 20 )) ${2:+-k "$2"}
    ;;
  bench-e2e)
    extension
    SLIMSTACK_BENCH_RESULTS="$OUT" run_for $(( $(left) - 30 )) python3 -m pytest -q -s \
      bench/test_bench_e2e.py -p no:cacheprovider ${2:+-k "$2"} 2>&1 | tee "$OUT/e2e.log" | tail -n 40
    for json in "$OUT"/*-e2e.json; do [ -f "$json" ] && python3 bench/plot_e2e.py "$json"; done
    ;;
  tune)
    extension
    shift
    run_for $(( $(left) - 10 )) python3 bench/tune_triton.py --out "$OUT/tune.json" "$@" 2>&1 \
      | tee "$OUT/tune.log" | tail -n 30
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
log "done"
