#!/usr/bin/env bash
# The GPU work, one phase per call of the lent machine. A task that draws a GPU has 15 device
# minutes in all (the machine's start, every call and every idle wait counted), a call at most
# 10, and $OUT comes back only as 8 files at most, 2 folders deep. So each phase bounds its
# steps with timeouts, puts the most needed evidence first, and packs $OUT at the end.
#
#   tools/gpu_session.sh lease                 # call 1 of a 15-minute lease (~9.5 min): headline
#                                              # kernel cases, GPU tests, core e2e variants,
#                                              # compute-sanitizer
#   tools/gpu_session.sh lease-rest            # call 2, at once while the machine is warm
#                                              # (~3.5 min): the other decode M values, a
#                                              # decode-step profile (bench/profile_decode.py),
#                                              # the e2e variants lease left out
#   tools/gpu_session.sh check                 # tests (GPU + compiled Triton), compute-sanitizer,
#                                              # then the headline kernel cases while time remains
#   tools/gpu_session.sh bench-kernels [EXPR]  # kernel suite (pytest -k EXPR, e.g. bfloat16)
#                                              # -> results JSON, plots, summary, dispatch table
#   tools/gpu_session.sh bench-e2e [EXPR]      # e2e variants (e.g. "dense-32L or 2:4-32L")
#   tools/gpu_session.sh tune [ARGS]           # Triton tile sweep (bench/tune_triton.py ARGS)
#
# Before the call, on the CPU machine: tools/prebuild_ext.sh (a slimstack._C for the image's
# Python 3.12 / torch 2.11 in .prebuilt/: saves a ~3-minute compile per call), and the
# nvidia-cutlass wheel in .whl/ for the fallback build (device tool README); carry
# [".prebuilt", ".whl"]. After it: python tools/gpu_results.py FILES_AT files what came back.
# GPU_SESSION_BUDGET (seconds) is what the call may use; give the device call a timeout_s a
# little above it. Default 570 (under the 600-second limit of a call), but 200 for lease-rest:
# what a 15-minute lease has left after the machine's start and a full lease call. Set it from
# status's budget_left_s (less ~30 s for the transfers) when that says otherwise.
# ../shared (stories260K, WikiText-2) does not travel, a shared/ inside the checkout does: copy
# it in first, `mkdir -p shared && cp -r ../shared/models ../shared/data shared/` (3.4 MB,
# ignored by git); without it every stories260K GPU test skips.
# The machine's copy of the tree likely has no .git (tracked and untracked files travel): name
# the commit, SLIMSTACK_COMMIT=<sha> before the script, or the results say "unknown" until
# tools/gpu_results.py fills in this checkout's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
START=$SECONDS
case "${1:-}" in
  lease-rest) DEFAULT_BUDGET=200 ;;
  *) DEFAULT_BUDGET=570 ;;
esac
BUDGET=${GPU_SESSION_BUDGET:-$DEFAULT_BUDGET}  # seconds this call may use

left() { echo $((BUDGET - (SECONDS - START))); }
# cap SECONDS [RESERVE]: SECONDS, or less so that RESERVE seconds of the budget stay for later
cap() { local want=$1 reserve=${2:-0} have; have=$(( $(left) - reserve )); echo $(( want < have ? want : have )); }
log() { echo "[gpu_session $((SECONDS - START))s] $*" | tee -a "$OUT/session.log"; }
# run_for SECONDS CMD...: SIGINT at the limit, so pytest still writes what it has measured
run_for() {
  local limit=$1
  shift
  if [ "$limit" -le 10 ]; then log "skipped (no time left): $*"; return 124; fi
  timeout -s INT -k 20 "$limit" "$@"
}

case "${1:-}" in lease|lease-rest|check|bench-*|tune) log "${1}: budget ${BUDGET} s" ;; esac

if [ ! -d ../shared ] && [ -d shared ]; then  # tests and bench helpers look here
  export SLIMSTACK_SHARED="$PWD/shared"
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

ext_has_cuda() { python3 -c "import torch, slimstack._C as c; assert c.with_cuda" 2>/dev/null; }

extension() {
  # editable install of the Python package; the native extension prebuilt or compiled here
  # (GPU_SESSION_EXT=installed: use what is installed, e.g. for a dry run on a CPU machine)
  if [ "${GPU_SESSION_EXT:-}" = installed ]; then
    python3 -m slimstack.cli info 2>&1 | tee -a "$OUT/session.log"
    return
  fi
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
  # the whole log goes to $OUT (tracebacks of failed cases, skip reasons); the tail is shown
  SLIMSTACK_BENCH_RESULTS="$OUT" run_for "$limit" python3 -m pytest -q bench/test_bench_kernels.py \
    --benchmark-only -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/kernels.log" | tail -n 25
  for json in "$OUT"/*-kernels.json; do
    [ -f "$json" ] || continue
    python3 bench/plot.py "$json" >/dev/null || true
    python3 bench/summarize.py "$json" >"$OUT/summary.md" || true
    python3 -m slimstack.ops.tuning "$json" --write "$OUT/dispatch_table.json" || true
  done
}

gpu_tests() {  # gpu_tests SECONDS: what only a GPU can check (CI runs the rest on CPU)
  log "GPU tests: markers gpu / cuda_ext, and the Triton kernels compiled"
  # shellcheck disable=SC2046
  run_for "$1" python3 -m pytest -q -m "(gpu or cuda_ext or interpreter) and not slow" \
    -p no:cacheprovider --maxfail=40 -rfE $(xdist 8) 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 40
  log "GPU tests exit: ${PIPESTATUS[0]}"
}

sanitizer() {  # sanitizer SECONDS
  log "compute-sanitizer memcheck on the small CUDA kernel tests"
  run_for "$1" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x \
    -p no:cacheprovider tests/test_cuda_kernels.py -k small 2>&1 | tail -n 30 \
    | tee "$OUT/sanitizer.log"
  log "sanitizer exit: ${PIPESTATUS[0]}"
}

e2e_bench() {  # e2e_bench SECONDS [-k EXPR]; knobs: SLIMSTACK_E2E_* (bench/test_bench_e2e.py)
  local limit=$1
  shift
  # The checkpoints (15 GB at 32 layers) go to memory when /dev/shm has room: no disk writes.
  if [ -z "${SLIMSTACK_E2E_DIR:-}" ] && [ -d /dev/shm ] \
    && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt $((40 * 1024 * 1024)) ]; then
    export SLIMSTACK_E2E_DIR=/dev/shm
  fi
  SLIMSTACK_BENCH_RESULTS="$OUT" run_for "$limit" python3 -m pytest -q -s \
    bench/test_bench_e2e.py -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/e2e.log" | tail -n 40
  for json in "$OUT"/*-e2e.json; do [ -f "$json" ] && python3 bench/plot_e2e.py "$json"; done
}

profile_decode() {  # profile_decode SECONDS VARIANT: one decode step, kernel by kernel (8 layers)
  local workdir=()
  [ -d /dev/shm ] && workdir=(--workdir /dev/shm)  # the 4 GB checkpoint in memory, not on disk
  run_for "$1" python3 bench/profile_decode.py --variant "$2" --layers 8 --out "$OUT" \
    "${workdir[@]}" 2>&1 | tee -a "$OUT/profile.log" | tail -n 30
}

# The device tool brings back 8 files of $OUT at most: keep the results JSON, the summary and
# the session log as they are, and pack everything else (logs, plots, dispatch table) into one
# archive that tools/gpu_results.py unpacks.
pack_out() {
  local keep=() rest=() f
  for f in "$OUT"/*; do
    [ -f "$f" ] || continue
    case "$(basename "$f")" in
      session.log|summary.md|*-kernels.json|*-kernels-[0-9]*.json|*-e2e.json) keep+=("$f") ;;
      *-decode-profile-*.md) keep+=("$f") ;;  # the table, to read at once (JSON in the archive)
      *) rest+=("$(basename "$f")") ;;
    esac
  done
  if [ "${#rest[@]}" -gt 0 ]; then
    tar -czf "$OUT/rest.tar.gz" -C "$OUT" "${rest[@]}" && (cd "$OUT" && rm -f "${rest[@]}")
  fi
  log "packed: ${#keep[@]} files kept, ${#rest[@]} in rest.tar.gz"
}

# The headline cases of the issues: bf16, every 7B / 13B shape, decode M = 1 and 16 and the
# prefill M = 2048 (about 140 cases) with the default providers (case ids read
# op-provider-NxK-M-dtype, so "-triton-" is the provider triton alone); every other provider
# is an A/B variant (bench/common.py says what each one tests), which lease-rest measures at
# the same M (about 155 cases). Cases run shape by shape, so a step cut at its limit loses
# whole shapes: the targets' rows go first.
HEADLINE_M="bfloat16 and (M1- or M16- or M2048-)"
DEFAULTS="-triton- or -cuda- or -cuda_sm90- or -torch- or -auto-"
HEADLINE="$HEADLINE_M and ($DEFAULTS)"
HEADLINE_VARIANTS="$HEADLINE_M and not ($DEFAULTS)"
# The e2e variants and configs the targets need: batch-1 decode, 2048-token prefill; and
# batch 8 at 128, the dense baseline of lease-rest's batch-8 rows (speedups are taken within
# the merged e2e file: a row without its dense-32L setting has none).
E2E_CORE="dense-32L or 2:4-32L or 2:4-24L"
E2E_CORE_CONFIGS=1x128,1x2048,8x128

case "${1:-}" in
  lease)  # each step capped so that the later ones keep at least their share
    extension
    log "headline kernel cases: $HEADLINE"
    kernel_bench "$(cap 200 330)" -k "$HEADLINE"
    gpu_tests "$(cap 150 250)"
    log "core e2e variants ($E2E_CORE), batch x prompt $E2E_CORE_CONFIGS, 128 new tokens"
    SLIMSTACK_E2E_CONFIGS=$E2E_CORE_CONFIGS SLIMSTACK_E2E_NEW_TOKENS=128 \
      e2e_bench "$(cap 240 60)" -k "$E2E_CORE"
    sanitizer "$(cap 60 5)"
    ;;
  lease-rest)
    extension
    log "the A/B variant rows at the headline M, a decode-step profile, the other M values"
    log "(bf16), the e2e variants lease left out: each while time remains"
    kernel_bench "$(cap 130 65)" -k "$HEADLINE_VARIANTS"
    profile_decode "$(cap 60 5)" 2:4
    kernel_bench "$(cap 60 15)" -k "bfloat16 and (M2- or M4- or M8- or M64- or M8192-)"
    SLIMSTACK_E2E_CONFIGS=1x128,8x128 SLIMSTACK_E2E_NEW_TOKENS=128 SLIMSTACK_E2E_HF=0 \
      e2e_bench "$(cap 240 15)" -k "32L and not dense and not 2:4 or dense-24L"
    ;;
  check)
    extension
    gpu_tests "$(cap 400 240)"
    sanitizer "$(cap 120 15)"
    log "headline kernel cases (bf16, Mistral-7B shapes, M = 1, 16, 2048)"
    kernel_bench $(( $(left) - 15 )) -k "bfloat16 and (4096x4096 or 14336x4096 or 4096x14336) and (M1- or M16- or M2048-)"
    ;;
  bench-kernels)
    extension
    kernel_bench $(( $(left) - 30 )) ${2:+-k "$2"}
    ;;
  bench-e2e)
    extension
    e2e_bench $(( $(left) - 40 )) ${2:+-k "$2"}
    ;;
  tune)
    extension
    shift
    run_for $(( $(left) - 15 )) python3 bench/tune_triton.py --out "$OUT/tune.json" "$@" 2>&1 \
      | tee "$OUT/tune.log" | tail -n 30
    ;;
  pack) ;;  # only pack what an earlier step left in $OUT
  *) sed -n '2,33p' "$0"; exit 2 ;;
esac
pack_out
log "done"
