#!/usr/bin/env bash
# The GPU check: one command for the day a GPU machine is lent (one H100, 16 cores, no network,
# this repository copied there, with or without .venv). It finds or makes a Python environment,
# builds solo_fast with CUDA for this device's architecture only, runs the GPU tests
# (`pytest -m gpu`), runs every op's benchmark cases on every CUDA backend against the reference
# (`solo-fast bench --size canonical --device cuda`: the cases of benchmarks/bench_<op>.py), runs
# one training step per model family with the fused losses against the reference losses
# (scripts/gpu_train_steps.py), and, if time is left, the pytest-benchmark files' CUDA cases.
# A markdown report goes to $OUT/gpu_report.md ($OUT set) or build/gpu_report.md, rewritten after
# every step, with every step's output in gpu_check.log beside it. A failed step is recorded and
# the next one runs; the exit status is 1 when any step failed. Sized to finish in under 8
# minutes on one H100 with 16 cores, the build included.
#   usage: bash scripts/gpu_check.sh [--dry-run]
#   --dry-run: no GPU needed: the same steps through the same runner and report, on the CPU
#   (bench --size quick, a tiny training step), the build and the GPU-only steps skipped.
set -uo pipefail  # not -e: a failed step must not stop the ones after it
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET_S=470  # the whole check's time on one H100; the optional last step gets what is left
HARD_S=480  # no step runs past this (a dry run on a slow CPU is not held to it)

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "gpu_check.sh: unknown argument '$1': expected nothing or --dry-run" >&2; exit 2 ;;
esac

REPORT_DIR="${OUT:-$ROOT/build}"
REPORT="$REPORT_DIR/gpu_report.md"
FULL_LOG="$REPORT_DIR/gpu_check.log"
LOG_DIR="$ROOT/build/gpu_logs"  # one file a step; only the report and the full log go to $OUT
mkdir -p "$REPORT_DIR" "$LOG_DIR"
rm -f "$LOG_DIR"/* "$FULL_LOG"
JOBS=$(nproc 2>/dev/null || echo 4)
export ROOT LOG_DIR JOBS PIP_DISABLE_PIP_VERSION_CHECK=1

NAMES=() RESULTS=() TOOK=() LOGS=() SHOW=() COMMANDS=()

write_report() {
  local passed=0 failed=0 skipped=0 i
  for i in "${!RESULTS[@]}"; do
    case "${RESULTS[$i]}" in
      PASS) passed=$((passed + 1)) ;;
      SKIP*) skipped=$((skipped + 1)) ;;
      *) failed=$((failed + 1)) ;;
    esac
  done
  {
    echo "# solo_fast GPU check"
    echo
    echo "- when: $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - START )) s so far"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
      git status --porcelain 2>/dev/null | grep -q . && echo ', with uncommitted changes')"
    echo "- machine: ${GPU_NAME:-no GPU seen}, ${JOBS} CPU cores; CUDA arch built: ${ARCH:-none}"
    echo "- python: ${PY:-none}"
    [ "$DRY_RUN" = 1 ] && echo "- **dry run** (no GPU): CPU stand-ins for the GPU steps"
    echo
    echo "**${passed} passed, ${failed} failed, ${skipped} skipped**"
    echo
    echo "| step | result | seconds | command |"
    echo "|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
      command=${COMMANDS[$i]:+\`${COMMANDS[$i]//|/\\|}\`}
      echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${TOOK[$i]} | ${command:-} |"
    done
    for i in "${!NAMES[@]}"; do
      [ -f "${LOGS[$i]}" ] || continue
      echo
      echo "## ${NAMES[$i]}: ${RESULTS[$i]}"
      echo
      echo '```'
      if [ "${SHOW[$i]}" = all ] && [ "${RESULTS[$i]}" = PASS ]; then
        tail -n 200 "${LOGS[$i]}"
      else  # the end holds pytest's summary, a traceback or the build's error
        tail -n 40 "${LOGS[$i]}"
      fi
      echo '```'
    done
  } > "$REPORT"
}

record() {  # record NAME RESULT SECONDS LOG SHOW COMMAND
  NAMES+=("$1") RESULTS+=("$2") TOOK+=("$3") LOGS+=("$4") SHOW+=("$5") COMMANDS+=("$6")
  write_report
}

skip_step() {  # skip_step NAME REASON
  echo "== $1: skipped ($2)"
  record "$1" "SKIP: $2" 0 "" tail ""
}

run_step() {  # run_step NAME LIMIT_S SHOW(all|tail) COMMAND...
  local name=$1 limit=$2 show=$3
  shift 3
  local log="$LOG_DIR/$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_').log"
  local command="$*" begin rc result left
  case "$1" in bash) command="${name} (a function of gpu_check.sh)" ;; esac
  left=$(( HARD_S - ($(date +%s) - START) ))
  if [ "$DRY_RUN" = 0 ] && [ "$left" -lt "$limit" ]; then
    if [ "$left" -lt 20 ]; then
      echo "== $name: not run (the ${HARD_S} s budget is spent)"
      record "$name" "FAIL: not run, the ${HARD_S} s budget was spent" 0 "" tail "$command"
      return 1
    fi
    limit=$left
  fi
  echo "== $name (at most ${limit} s): $command"
  begin=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1 < /dev/null
  rc=$?
  case $rc in
    0) result=PASS ;;
    124 | 137) result="FAIL: timed out after ${limit} s" ;;
    *) result="FAIL: exit status $rc" ;;
  esac
  { echo "===== $name: $result"; cat "$log"; echo; } >> "$FULL_LOG"
  tail -n 5 "$log"
  echo "-> $result"
  record "$name" "$result" "$(( $(date +%s) - begin ))" "$log" "$show" "$command"
  return $rc
}

prepare_env() {
  # Prints what it chose and writes the interpreter's path to $LOG_DIR/python.
  usable() {  # a torch that pyproject.toml accepts (>= 2.4, < 2.15)
    local check="import sys, torch; version = torch.__version__.split('+')[0].split('.')
sys.exit(0 if (2, 4) <= tuple(int(x) for x in version[:2]) < (2, 15) else 1)"
    "$1" -c "$check" 2>/dev/null
  }
  local py
  if [ -n "${SOLO_FAST_PY:-}" ]; then
    echo "using SOLO_FAST_PY=$SOLO_FAST_PY"
    py=$SOLO_FAST_PY
  elif [ -x "$ROOT/.venv/bin/python" ] && usable "$ROOT/.venv/bin/python"; then
    echo "using the existing .venv"
    py=$ROOT/.venv/bin/python
  elif command -v python3 > /dev/null && usable python3; then
    # The GPU image's python3 holds torch, triton and pytest; a venv over it needs no download.
    echo "no usable .venv: a virtual environment over python3's own packages (build/gpu-venv)"
    [ -x "$ROOT/build/gpu-venv/bin/python" ] \
      || python3 -m venv --system-site-packages "$ROOT/build/gpu-venv" || return 1
    py=$ROOT/build/gpu-venv/bin/python
  else
    echo "no torch here: scripts/setup_env.sh (torch from the local package store; it builds too)"
    PIP_RETRIES=1 PIP_TIMEOUT=20 bash "$ROOT/scripts/setup_env.sh" || return 1
    py=$ROOT/.venv/bin/python
    touch "$LOG_DIR/built_by_setup_env"
  fi
  "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" || return 1
  for module in pytest pytest_benchmark triton pycocotools xdist; do
    "$py" -c "import $module" 2>/dev/null && echo "$module: present" || echo "$module: MISSING"
  done
  echo "$py" > "$LOG_DIR/python"
}

build_native() {
  if [ -f "$LOG_DIR/built_by_setup_env" ]; then
    echo "built by scripts/setup_env.sh (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
    log=$ROOT/build/build.log
  else
    log=$ROOT/build/gpu_build.log
    # Spills are listed by the ptxas summary below but do not stop the check.
    SOLO_FAST_CUDA=1 SOLO_FAST_STRICT_PTXAS=0 MAX_JOBS=$JOBS \
      "$PY" -m pip install -v --no-build-isolation --no-deps -e "$ROOT" > "$log" 2>&1 \
      || { tail -n 60 "$log"; echo "solo_fast build FAILED (log: $log)"; return 1; }
  fi
  grep -m1 "solo_fast: CUDA kernels" "$log"
  "$PY" "$ROOT/scripts/ptxas_summary.py" < "$log" | tail -n 60
  "$PY" -c "from solo_fast.ops import cuda_compiled; import sys
print('CUDA kernels compiled in:', cuda_compiled()); sys.exit(0 if cuda_compiled() else 1)"
}
export -f prepare_env build_native

# 1. The device and the toolkit; the architecture to build for.
if command -v nvidia-smi > /dev/null; then
  run_step "GPU and CUDA toolkit" 60 all bash -c \
    "nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv;
     nvcc --version 2>/dev/null | tail -n 2 || echo 'nvcc not on PATH'"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 \
    | tr -d ' ')
else
  skip_step "GPU and CUDA toolkit" "nvidia-smi not found"
fi

# 2. A Python with torch.
run_step "Python environment" 420 all bash -c "prepare_env"
PY=$(cat "$LOG_DIR/python" 2>/dev/null || true)
if [ -n "$PY" ] && [ -z "${ARCH:-}" ] && [ "$DRY_RUN" = 0 ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
    2>/dev/null || true)
fi
export PY TORCH_CUDA_ARCH_LIST="${ARCH:-}"  # setup.py builds for this list only

# 3. The native library, CUDA kernels for this device's architecture only.
if [ -z "$PY" ]; then
  skip_step "Build (CUDA, this GPU's arch)" "no Python environment"
elif [ "$DRY_RUN" = 1 ]; then
  skip_step "Build (CUDA, this GPU's arch)" "dry run: the library already built is used"
elif [ -z "${ARCH:-}" ]; then
  skip_step "Build (CUDA, this GPU's arch)" "no CUDA device: its architecture is unknown"
else
  run_step "Build (CUDA sm_${ARCH/./})" 330 all bash -c "build_native"
fi

CUDA_SEEN=0
[ -n "$PY" ] && CUDA_SEEN=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" \
  2>/dev/null || echo 0)
if [ -z "$PY" ] || { [ "$DRY_RUN" = 0 ] && [ "$CUDA_SEEN" != 1 ]; }; then
  # Without a CUDA device the GPU tests would all be skipped and pass: record them as failed.
  reason=$([ -z "$PY" ] && echo "no Python environment" || echo "torch sees no CUDA device")
  for step in "GPU tests" "Op benchmarks" "Training steps"; do
    record "$step" "FAIL: $reason" 0 "" tail ""
  done
else
  run_step "solo-fast info" 60 all "$PY" -m solo_fast.cli info

  # 4. The tests marked gpu; without pycocotools one test file cannot be collected, the others
  # still run. pytest-xdist, where present, spreads Triton's compilations over the cores.
  PARALLEL=()
  if [ "$DRY_RUN" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    PARALLEL=(-n 8)
  fi
  run_step "GPU tests (pytest -m gpu)" 240 tail "$PY" -m pytest tests -m gpu -q \
    -p no:cacheprovider --continue-on-collection-errors -rfEs "${PARALLEL[@]}"

  # 5. Every op's benchmark cases, every backend against the reference. cuBLAS and cuDNN would
  # otherwise round the references' matrix products to TF32.
  if [ "$DRY_RUN" = 1 ]; then
    run_step "Op benchmarks (solo-fast bench)" 180 all "$PY" -m solo_fast.cli bench \
      --size quick --device cpu --repeats 3 --max-error 1e-5
  else
    run_step "Op benchmarks (solo-fast bench)" 150 all env NVIDIA_TF32_OVERRIDE=0 \
      "$PY" -m solo_fast.cli bench --size canonical --device cuda --repeats 20 --max-error 1e-3
  fi

  # 6. One training step per family: the fused losses against the reference losses.
  if [ "$DRY_RUN" = 1 ]; then
    run_step "Training steps" 600 all env PYTHONPATH="$ROOT" "$PY" scripts/gpu_train_steps.py \
      --device cpu --size 64 --families solov2_light --repeats 1
  else
    run_step "Training steps" 150 all env PYTHONPATH="$ROOT" "$PY" scripts/gpu_train_steps.py
  fi

  # 7. The figures of record, if time is left: the pytest-benchmark files' CUDA cases.
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$DRY_RUN" = 1 ]; then
    skip_step "pytest-benchmark, CUDA cases" "dry run: no CUDA cases"
  elif [ "$left" -lt 60 ]; then
    skip_step "pytest-benchmark, CUDA cases" "${left} s left of the ${BUDGET_S} s budget"
  else
    run_step "pytest-benchmark, CUDA cases" "$left" tail env NVIDIA_TF32_OVERRIDE=0 \
      "$PY" -m pytest benchmarks/bench_dice_loss.py benchmarks/bench_decoupled_dice_loss.py \
      benchmarks/bench_dynamic_mask_dice_loss.py benchmarks/bench_decoupled_mask_scores.py \
      benchmarks/bench_dynamic_mask_scores.py benchmarks/bench_solo_mask_scores.py \
      benchmarks/bench_matrix_nms.py -k cuda -q -p no:cacheprovider \
      --benchmark-columns=median,iqr,rounds --benchmark-json "$REPORT_DIR/gpu_benchmarks.json"
  fi
fi

write_report
echo "report: $REPORT"
for result in "${RESULTS[@]}"; do
  case "$result" in PASS | SKIP*) ;; *) exit 1 ;; esac
done
exit 0
