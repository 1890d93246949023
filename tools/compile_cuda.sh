#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90a (no GPU needed), print a ptxas
# register/spill table per kernel, and exit non-zero if anything fails to compile.
#
#   tools/compile_cuda.sh                 # all .cu files, both archs, 2 parallel jobs, + glue
#   tools/compile_cuda.sh csrc/cuda/sparse24_gemv.cu
#   tools/compile_cuda.sh --no-glue       # skip the syntax check of csrc/cuda/glue.cpp
#
# Environment: NVCC (default nvcc), JOBS (default 2), CUTLASS_INCLUDE (default: the headers of
# the installed nvidia-cutlass wheel), PYTHON (default python3), OUT_DIR (default a temp dir).
#
# Objects go to OUT_DIR (compile only, -c); nothing in the repository is written.
# The glue check (when all .cu files are compiled and torch is importable) compiles glue.cpp and
# bindings.cpp with -fsyntax-only and SLIMSTACK_WITH_CUDA against the installed torch headers: a
# CPU torch wheel cannot build them for real, and lacks c10/cuda/impl/cuda_cmake_macros.h, for
# which an empty stand-in is supplied. nvcc flags mirror torch's CUDAExtension (the -D__CUDA_NO_*).
# Timing: about 200 s of CPU in all, 100 of them the sm_90a CUTLASS file (the critical path).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/slimstack-cuda-XXXXXX)}"
CHECK_GLUE=1
FILES=()
for arg in "$@"; do
  case "$arg" in
    --glue) CHECK_GLUE=1 ;;
    --no-glue) CHECK_GLUE=0 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) FILES+=("$arg") ;;
  esac
done
if [ "${#FILES[@]}" -eq 0 ]; then
  mapfile -t FILES < <(ls "$ROOT"/csrc/cuda/*.cu)
elif [ "$CHECK_GLUE" -eq 1 ] && [[ " $* " != *" --glue "* ]]; then
  CHECK_GLUE=0  # a subset of files: only check the glue when asked
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
  local start end status=0 cpu="?"
  local timer=()
  # CPU seconds (user + sys) as well as wall time: the wall time of a shared 2-core box says
  # more about the neighbours than about the build.
  if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -f "%U %S" -o "$log.cpu"); fi
  start=$(date +%s)
  # The -D flags are the ones torch's CUDAExtension adds to every .cu (setup.py builds with it).
  "${timer[@]}" "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -gencode "$gencode" -Xptxas -v \
    -I "$ROOT/csrc" -I "$CUTLASS_INCLUDE" \
    -c "$src" -o "$obj" >"$log" 2>&1 || status=$?
  end=$(date +%s)
  if [ -f "$log.cpu" ]; then cpu="$(awk 'END { printf "%.0f", $1 + $2 }' "$log.cpu")"; fi
  echo "$status $((end - start)) $cpu" >"$log.status"
  if [ "$status" -eq 0 ]; then
    echo "  ok    $name [$arch] $((end - start)) s wall, $cpu s cpu"
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
printf '%-6s %-20s %-66s %5s %7s %7s %6s\n' arch file kernel regs spill_st spill_ld stack
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
        pretty="$(echo "$pretty" | sed -E 's/\(anonymous namespace\):://g; s/slimstack::cuda:://g;
          s/^void //; s/\(.*$//; s/cutlass::device_kernel<//; s/cutlass::(transform|gemm)::kernel:://g;
          s/cute::tuple<int, int, int, int>, //')"
        # CUTLASS kernel names can defeat c++filt; label them by what they are
        if [[ "$pretty" == _Z* ]]; then
          case "$pretty" in
            *GemmUniversal*Sparse*) pretty="CUTLASS sm90 sparse GEMM (GemmUniversal)" ;;
            *) pretty="${pretty:0:40}..." ;;
          esac
        fi
        case "$fn" in
          *cutlass*bfloat16*) pretty="$pretty [bf16]" ;;
          *cutlass*half_t*) pretty="$pretty [fp16]" ;;
        esac
        printf '%-6s %-20s %-66.66s %5s %7s %7s %6s\n' "$a" "$fl" "$pretty" "$regs" "$st" "$ld" "$stack"
      done
  done
done
echo
cpu_total="$(cat "$OUT_DIR"/*.log.status 2>/dev/null | awk '$3 != "?" { s += $3 } END { print s + 0 }')"
echo "nvcc: $((T1 - T0)) s wall, ${cpu_total} s cpu for ${#FILES[@]} file(s) x 2 archs ($JOBS parallel jobs)"

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

# ptxas serialises every wgmma of a kernel that makes a call (a device assert's __assertfail,
# a printf): warning C7510. A tensor-core kernel with that warning runs each HGMMA to completion
# before issuing the next, so it is a build failure, not a note.
serialized="$(grep -l "C7510" "$OUT_DIR"/*.sm90a.log 2>/dev/null || true)"
if [ -n "$serialized" ]; then
  echo
  echo "compile_cuda.sh: ptxas serialised wgmma (warning C7510) in:" >&2
  for log in $serialized; do
    echo "---- $log" >&2
    grep -m 3 -o "C7510.\{0,160\}" "$log" >&2 || true
  done
  exit 1
fi

# The GEMV's programmatic dependent launch is safe only if nothing but weights is read before
# its griddepcontrol.wait (tools/check_gemv_sass.py): check the sm_90a object's SASS.
gemv_obj="$OUT_DIR/sparse24_gemv.sm90a.o"
if [ -f "$gemv_obj" ]; then
  echo
  sass_status=0
  "$PYTHON" "$ROOT/tools/check_gemv_sass.py" "$gemv_obj" || sass_status=$?
  if [ "$sass_status" -eq 1 ]; then
    echo "compile_cuda.sh: the sm_90a GEMV reads more than its weights before waiting" >&2
    exit 1
  fi
fi

if [ "$CHECK_GLUE" -eq 1 ]; then
  echo
  if ! TORCH_INC="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)"; then
    echo "glue check skipped: torch is not importable with $PYTHON"
  else
    echo "syntax-checking csrc/cuda/glue.cpp and csrc/bindings.cpp with SLIMSTACK_WITH_CUDA:"
    PY_INC="$("$PYTHON" -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])')"
    CUDA_INC="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
    # nvcc may be a wrapper script; fall back to the usual location
    [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
    STUB="$OUT_DIR/stub_include"
    mkdir -p "$STUB/c10/cuda/impl"
    if ! "$PYTHON" -c 'import torch, os, sys; p = os.path.join(os.path.dirname(torch.__file__), "include", "c10", "cuda", "impl", "cuda_cmake_macros.h"); sys.exit(0 if os.path.exists(p) else 1)'; then
      echo '#pragma once' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
    fi
    check_cpp() {
      local src="$1" log="$OUT_DIR/$(basename "$1").log" g0
      g0=$(date +%s)
      # shellcheck disable=SC2086
      if g++ -std=c++17 -fsyntax-only -Wall -DSLIMSTACK_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
          -I "$STUB" $TORCH_INC $PY_INC -I "$CUDA_INC" -I "$ROOT/csrc" "$src" 2>"$log"; then
        echo "  ok    $(basename "$src") $(( $(date +%s) - g0 )) s"
      else
        echo "  FAIL  $(basename "$src") (log: $log)"
        grep -m 20 "error" "$log" || true
        return 1
      fi
    }
    # the two checks are independent: run them side by side
    check_cpp "$ROOT/csrc/cuda/glue.cpp" & glue_pid=$!
    bindings_ok=0; check_cpp "$ROOT/csrc/bindings.cpp" || bindings_ok=1
    glue_ok=0; wait "$glue_pid" || glue_ok=1
    if [ "$glue_ok" -ne 0 ] || [ "$bindings_ok" -ne 0 ]; then
      echo "compile_cuda.sh: glue syntax check FAILED" >&2
      exit 1
    fi
  fi
fi
echo "total: $(( $(date +%s) - T0 )) s"
