#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: creates the virtual environment (if missing),
# installs torch from the local package store and solo_fast in editable mode, and builds the native
# library with its CUDA sources when a CUDA toolkit is found (compile-only on a machine without a GPU).
# Afterwards $PY is the environment's python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${SOLO_FAST_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== installing torch, torchvision and the build/test requirements into $VENV"
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q "setuptools>=69" wheel "pybind11>=2.12" "ninja>=1.11" "pycocotools>=2.0.7" \
  numpy "pytest>=8" "pytest-benchmark>=4" expecttest "hypothesis>=6" \
  "onnx>=1.17" "onnxscript>=0.3.1" "onnxruntime>=1.20"

echo "== building solo_fast (SOLO_FAST_CUDA=${SOLO_FAST_CUDA:-auto}); ptxas reports follow"
mkdir -p build
# A spill or local-memory use in any CUDA kernel fails this build (ptxas -Werror).
export SOLO_FAST_STRICT_PTXAS="${SOLO_FAST_STRICT_PTXAS:-1}"
export MAX_JOBS="${MAX_JOBS:-2}"
# An editable install recompiles everything; skip it when the built library is newer than every
# native source and the build settings file.
library=$(ls solo_fast/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$library" ] && [ -f build/build.log ] && "$PY" -c "import solo_fast" 2>/dev/null \
   && [ -z "$(find csrc setup.py pyproject.toml -newer "$library" -type f | head -n 1)" ]; then
  echo "(native library up to date: $library)"
elif ! "$PY" -m pip install -v --no-build-isolation --no-deps -e . > build/build.log 2>&1; then
  tail -n 60 build/build.log
  echo "solo_fast build FAILED (full log: build/build.log)" >&2
  exit 1
fi
grep -m1 "solo_fast: CUDA kernels" build/build.log | sed -E 's/^ +//'
if grep -q "solo_fast: CUDA kernels ON" build/build.log; then
  "$PY" scripts/ptxas_summary.py < build/build.log
fi
"$PY" -m solo_fast.cli info
