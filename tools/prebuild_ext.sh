#!/usr/bin/env bash
# Build slimstack._C here (no GPU needed) for the lent GPU machine, so its calls skip a
# 3-minute compile: each call of the device tool starts a bare machine.
#
# The device image runs Python 3.12 with torch 2.11.0+cu130 (the device tool's KINDS.md);
# a venv with that torch wheel and this machine's nvcc 13.0 builds an extension it imports
# as is. The result lands in .prebuilt/ (git-ignored) with a stamp of the torch version and
# the sources; tools/gpu_session.sh uses it only when the stamp matches there, else it builds.
#
#   tools/prebuild_ext.sh [VENV]          # default VENV: /tmp/slimstack-device-venv
#   # then: device run with carry [".prebuilt", ".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/slimstack-device-venv}
TORCH_PIN=${TORCH_PIN:-2.11.0}
# A Python 3.12 that runs: a pyenv shim named python3.12 exists here but fails unless 3.12 is
# the selected version, so each candidate is tried, not just found.
PY312=${PY312:-}
if [ -z "$PY312" ]; then
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12.*/bin/python; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate
      break
    fi
  done
fi
[ -n "$PY312" ] || { echo "prebuild_ext.sh: no Python 3.12 found (set PY312)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_PIN" nvidia-cutlass==4.2.0.0 pybind11 ninja setuptools
fi
# (setup.py finds a CUDA_HOME with the toolkit headers, or says to set one)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SLIMSTACK_BUILD_CUDA=1

"$VENV/bin/python" setup.py -q build_ext --inplace
suffix=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
mkdir -p .prebuilt
strip --strip-debug -o ".prebuilt/_C$suffix" "python/slimstack/_C$suffix"
"$VENV/bin/python" tools/ext_stamp.py > .prebuilt/stamp
PYTHONPATH=python "$VENV/bin/python" - <<'EOF'  # the package is not installed in VENV
import torch, slimstack._C as ext
assert ext.with_cuda, "built without the CUDA kernels"
print("slimstack._C for torch", torch.__version__, "with CUDA kernels")
EOF
ls -la .prebuilt
echo "carry .prebuilt (and .whl) in the device run; tools/gpu_session.sh picks it up"
