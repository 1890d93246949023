#!/usr/bin/env bash
# One phase of the GPU work per call of the lent machine (each call has a 10-minute limit).
# Results land in $OUT (the device tool brings back at most 8 files, 2 folders deep).
#
#   tools/gpu_session.sh build-test       # build sm_90a, GPU tests, compute-sanitizer
#   tools/gpu_session.sh bench-kernels    # kernel suite -> results JSON + plots
#   tools/gpu_session.sh bench-e2e dense-32L   # one e2e variant per call
#
# Missing wheels (nvidia-cutlass) travel in .whl/ (see the device tool's README) and are
# installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
build() {
  # the image's torch is a CUDA build: setup.py compiles csrc/cuda for these archs
  # (editable: slimstack.kernels maps to kernels/ through setup.py's package_dir)
  TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 python3 -m pip install -q --no-build-isolation \
    --no-deps -e . 2>&1 | tail -n 5
  python3 -m slimstack.cli info
}
case "${1:-}" in
  build-test)
    build
    set +e
    python3 -m pytest -q -m gpu -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 30
    compute-sanitizer --tool memcheck python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_cuda_kernels.py -k small 2>&1 | tail -n 20 | tee "$OUT/sanitizer.log"
    ;;
  bench-kernels)
    build
    SLIMSTACK_BENCH_RESULTS="$OUT" python3 -m pytest -q bench/test_bench_kernels.py \
      --benchmark-only -p no:cacheprovider 2>&1 | tail -n 20
    for json in "$OUT"/*.json; do python3 bench/plot.py "$json" || true; done
    ;;
  bench-e2e)
    build
    SLIMSTACK_BENCH_RESULTS="$OUT" python3 -m pytest -q -s bench/test_bench_e2e.py \
      -k "${2:?variant, e.g. dense-32L}" -p no:cacheprovider 2>&1 | tail -n 30
    ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
