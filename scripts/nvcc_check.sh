#!/usr/bin/env bash
# Compile-only check of CUDA sources, one by one, outside the extension build: the same nvcc flags
# as setup.py (sm_80 and sm_90, ptxas -v with spills and local memory as errors), objects thrown
# away, a one-line-per-kernel ptxas summary printed. Lets a kernel author iterate on a .cu file
# without rebuilding (and replacing) the installed library.
#   usage: scripts/nvcc_check.sh csrc/cuda/<op>.cu [more.cu ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
CUDA_HOME="${CUDA_HOME:-$(ls -d /usr/local/cuda-* 2>/dev/null | sort -V | tail -n 1)}"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
for source in "$@"; do
  log="$OUT/$(basename "$source").log"
  if ! "$CUDA_HOME/bin/nvcc" -DSOLO_FAST_WITH_CUDA -Icsrc -I"$SITE/nvidia/cu13/include" \
      -I"$SITE/torch/include" -I"$SITE/torch/include/torch/csrc/api/include" \
      -I"$CUDA_HOME/include" -I"$PYINC" -c "$source" -o "$OUT/$(basename "$source").o" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
      --compiler-options -fPIC -O3 -std=c++20 -Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror \
      -lineinfo -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 > "$log" 2>&1; then
    cat "$log"
    echo "nvcc_check: $source FAILED" >&2
    status=1
    continue
  fi
  echo "== $source"
  "$PY" scripts/ptxas_summary.py < "$log"
done
exit $status
