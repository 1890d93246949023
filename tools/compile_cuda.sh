#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90a (no GPU needed), print a ptxas
# register/spill table per kernel, and exit non-zero if anything fails to compile.
#
#   tools/compile_cuda.sh                 # all .cu files, both archs, 2 parallel jobs
#   tools/compile_cuda.sh csrc/cuda/sparse24_gemv.cu
#   tools/compile_cuda.sh --glue          # also syntax-check csrc/cuda/glue.cpp against torch
#
# Environment: NVCC (default nvcc), JOBS (default 2), CUTLASS_INCLUDE (default: the headers of
# the installed nvidia-cutlass wheel), PYTHON (default python3), OUT_DIR (default a temp dir).
#
# Objects go to OUT_DIR (compile only, -c); nothing in the repository is written.
# The glue check compiles glue.cpp with -fsyntax-only against the installed torch headers; a
# CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h, so an empty stand-in is supplied.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/slimstack-cuda-XXXXXX)}"
CHECK_GLUE=0
FILES=()
for arg in "$@"; do
  case "$arg" in
    --glue) CHECK_GLUE=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) FILES+=("$arg") ;;
  esac
done
if [ "${#FILES[@]}" -eq 0 ]; then
  mapfile -t FILES < <(ls "$ROOT"/csrc/cuda/*.cu)
fi

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda.sh: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
if [ -z "${CUTLASS_INCLUDE:-}" ]; then
  CUTLASS_INCLUDE="$("$PYTHON" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)"
fi
if [ ! -f "${CUTLASS_INCLUDE:-/nonexistent}/cutlass/cutlass.h" ]; then
  echo "compile_cuda.sh: CUTLASS headers not found; pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "CUTLASS: $CUTLASS_INCLUDE"
echo "objects and logs: $OUT_DIR"

# One job per (file, arch) so the two slow CUTLASS builds do not serialise behind each other.
compile_one() {
  local src="$1" arch="$2"
  local name; name="$(basename "$src" .cu)"
  local obj="$OUT_DIR/$name.$arch.o" log="$OUT_DIR/$name.$arch.log"
  local gencode
  case "$arch" in
    sm80) gencode="arch=compute_80,code=sm_80" ;;
    sm90a) gencode="arch=compute_90a,code=sm_90a" ;;
  esac
  local start end status=0
  start=$(date +%s)
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo \
    -gencode "$gencode" -Xptxas -v \
    -I "$ROOT/csrc" -I "$CUTLASS_INCLUDE" \
    -c "$src" -o "$obj" >"$log" 2>&1 || status=$?
  end=$(date +%s)
  echo "$status $((end - start))" >"$log.status"
  if [ "$status" -eq 0 ]; then
    echo "  ok    $name [$arch] $((end - start)) s"
  else
    echo "  FAIL  $name [$arch] $((end - start)) s (log: $log)"
  fi
}
export -f compile_one
export NVCC OUT_DIR ROOT CUTLASS_INCLUDE

T0=$(date +%s)
echo "compiling ${#FILES[@]} file(s) x 2 archs with $JOBS job(s):"
for f in "${FILES[@]}"; do
  printf '%s\0sm80\0%s\0sm90a\0' "$f" "$f"
done | xargs -0 -n 2 -P "$JOBS" bash -c 'compile_one "$0" "$1"'
T1=$(date +%s)

# ---- ptxas summary: one line per kernel and arch ----
echo
printf '%-6s %-26s %-60s %5s %7s %7s %6s\n' arch file kernel regs spill_st spill_ld stack
failed=0
for f in "${FILES[@]}"; do
  name="$(basename "$f" .cu)"
  for arch in sm80 sm90a; do
    log="$OUT_DIR/$name.$arch.log"
    if [ ! -f "$log.status" ] || [ "$(cut -d' ' -f1 "$log.status")" != 0 ]; then
      failed=1
      continue
    fi
    # ptxas prints, per function: "Function properties for X", "N bytes stack frame, S bytes
    # spill stores, L bytes spill loads", then "Used R registers".
    awk -v arch="$arch" -v file="$name" '
      /Function properties for/ { fn = $NF; next }
      /bytes stack frame/ { stack = $1; st = $5; ld = $9; next }
      /Used [0-9]+ registers/ {
        for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1);
        if (fn != "") print arch "\t" file "\t" fn "\t" regs "\t" st "\t" ld "\t" stack;
        fn = ""
      }' "$log" | sort -u | while IFS=$'\t' read -r a fl fn regs st ld stack; do
        pretty="$(echo "$fn" | c++filt 2>/dev/null || echo "$fn")"
        # keep the kernel name and template arguments, drop namespaces and parameter lists
        pretty="$(echo "$pretty" | sed -E 's/\(anonymous namespace\):://g; s/slimstack::cuda:://g; s/^void //; s/\(.*$//')"
        printf '%-6s %-26s %-60.60s %5s %7s %7s %6s\n' "$a" "$fl" "$pretty" "$regs" "$st" "$ld" "$stack"
      done
  done
done
echo
echo "nvcc wall time: $((T1 - T0)) s for ${#FILES[@]} file(s) x 2 archs ($JOBS parallel jobs)"

if [ "$failed" -ne 0 ]; then
  echo
  echo "compile_cuda.sh: compilation FAILED; first errors:" >&2
  for log in "$OUT_DIR"/*.log; do
    if [ -f "$log.status" ] && [ "$(cut -d' ' -f1 "$log.status")" != 0 ]; then
      echo "---- $log" >&2
      grep -m 20 -E "error|Error" "$log" >&2 || tail -n 20 "$log" >&2
    fi
  done
  exit 1
fi

if [ "$CHECK_GLUE" -eq 1 ]; then
  echo
  echo "syntax-checking csrc/cuda/glue.cpp against torch (SLIMSTACK_WITH_CUDA defined):"
  TORCH_INC="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')"
  PY_INC="$("$PYTHON" -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])')"
  CUDA_INC="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
  # nvcc may be a wrapper script; fall back to the usual location
  [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
  STUB="$OUT_DIR/stub_include"
  mkdir -p "$STUB/c10/cuda/impl"
  if ! "$PYTHON" -c 'import torch, os, sys; p = os.path.join(os.path.dirname(torch.__file__), "include", "c10", "cuda", "impl", "cuda_cmake_macros.h"); sys.exit(0 if os.path.exists(p) else 1)'; then
    echo '#pragma once' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  g0=$(date +%s)
  # shellcheck disable=SC2086
  g++ -std=c++17 -fsyntax-only -Wall -Wno-c++20-extensions -DSLIMSTACK_WITH_CUDA \
    -DTORCH_EXTENSION_NAME=_C -I "$STUB" $TORCH_INC $PY_INC -I "$CUDA_INC" -I "$ROOT/csrc" \
    "$ROOT/csrc/cuda/glue.cpp"
  echo "  ok    glue.cpp $(( $(date +%s) - g0 )) s"
fi
echo "total: $(( $(date +%s) - T0 )) s"
