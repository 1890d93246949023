#!/usr/bin/env bash
# The GPU image's Python packages on this CPU machine, before a lease: its transformers (5.17)
# under the whole CPU suite, its Triton (3.6) compiling every kernel for sm_90 and running the
# interpreter tests (with NumPy < 2.4, which 3.6's interpreter needs). Installed into target
# folders beside the project's venv and put first on PYTHONPATH; the venv is not changed.
#
#   bash tools/image_compat.sh [PYTHON]     # PYTHON: the project's venv python (default python3)
#
# Each step says PASS or FAIL; the exit code is the number of failed steps. Needs PyPI.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
TRANSFORMERS=${IMAGE_TRANSFORMERS:-5.17.0}
TRITON=${IMAGE_TRITON:-3.6.0}
SITE=${IMAGE_COMPAT_DIR:-/tmp/slimstack-image-compat}
failed=0
step() {  # step NAME CMD...: runs CMD, logs to $SITE/NAME.log, prints PASS/FAIL and the tail
  local name=$1
  shift
  if "$@" >"$SITE/$name.log" 2>&1; then
    echo "PASS $name: $(tail -n 1 "$SITE/$name.log")"
  else
    echo "FAIL $name (log: $SITE/$name.log)"
    tail -n 15 "$SITE/$name.log"
    failed=$((failed + 1))
  fi
}
mkdir -p "$SITE"
install() {  # install DIR SPEC [--no-deps]
  [ -d "$SITE/$1" ] || "$PY" -m pip install -q --target "$SITE/$1" "${@:2}"
}
install transformers "transformers==$TRANSFORMERS" || exit 90
install triton "triton==$TRITON" --no-deps || exit 91
install numpy "numpy<2.4" --no-deps || exit 92

step "transformers-$TRANSFORMERS-suite" env PYTHONPATH="$SITE/transformers" \
  "$PY" -m pytest -q -p no:cacheprovider
step "triton-$TRITON-aot-sm90" env -u TRITON_INTERPRET PYTHONPATH="$SITE/triton" \
  "$PY" -m slimstack.kernels.aot --arch 90 --dtypes bf16,fp16 --json "$SITE/aot.json"
step "triton-$TRITON-interpreter" env TRITON_INTERPRET=1 PYTHONPATH="$SITE/triton:$SITE/numpy" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_engine_kernels.py
exit "$failed"
