#!/usr/bin/env bash
# The one command to run on the GPU machine, from the repository root:
#
#     bash benchmarks/run_gpu_check.sh "$OUT" [python -m benchmarks.gpu_check options, e.g. --quick]
#     python benchmarks/gpu_goals.py "$OUT/gpu_check.json"     # the goals, again, from the JSON
#
# Writes $OUT/gpu_check.json, $OUT/summary.md and $OUT/logs/ (build and worker logs, no build
# artifacts) and prints the summary. Exit status 0 when gpu_check.json was written by the check
# (whatever it recorded: failures are in the JSON), 1 when it was not (a stub JSON is written then).
#
# Environment (all optional):
#   PYTHON              interpreter to use (default: the first of python3, python that imports torch)
#   GPU_CHECK_TIMEOUT   hard wall-clock limit in seconds (default 480: 8 minutes); the check gets a budget
#                       25 s shorter and writes its JSON before it, `timeout` is the safety net
#   MAX_JOBS            parallel compile jobs (default: nproc)
#   TORCH_CUDA_ARCH_LIST  default: the local card's capability (nvidia-smi, else torch)
#   CSSFE_EXT_DIR       extension build cache (default /tmp/cssfe_gpu_check/extensions, never under $OUT;
#                       a second run on the same machine reuses the build)
set -u

OUT=${1:?usage: bash benchmarks/run_gpu_check.sh OUT_DIR [python -m benchmarks.gpu_check options]}
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
      PY=$cand
      break
    fi
  done
  PY=${PY:-python3}  # no torch anywhere: the check still records that in its JSON
fi

export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' \r')
  if ! [[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]]; then
    CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null | tail -n 1)
  fi
  if [[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]]; then
    export TORCH_CUDA_ARCH_LIST=$CAP
  fi
fi

TMP_BASE=${TMPDIR:-/tmp}
export CSSFE_EXT_DIR=${CSSFE_EXT_DIR:-$TMP_BASE/cssfe_gpu_check/extensions}
case "$CSSFE_EXT_DIR/" in
  "$OUT"/*) export CSSFE_EXT_DIR=$TMP_BASE/cssfe_gpu_check/extensions ;;  # no build artifacts in $OUT
esac
mkdir -p "$CSSFE_EXT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset CSSFE_NO_CUDA CSSFE_NO_JIT CSSFE_KERNEL_BACKEND TRITON_INTERPRET

LIMIT=${GPU_CHECK_TIMEOUT:-480}
BUDGET=$((LIMIT - 25))
if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
PGIDS=$(mktemp "$TMP_BASE/cssfe_gpu_check_pgids.XXXXXX")
export GPU_CHECK_PGID_FILE=$PGIDS

echo "run_gpu_check: python=$PY MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}" \
     "CSSFE_EXT_DIR=$CSSFE_EXT_DIR limit=${LIMIT}s budget=${BUDGET}s"
rm -f "$OUT/gpu_check.json"
timeout -k 20 "$LIMIT" "$PY" -m benchmarks.gpu_check --out "$OUT" --budget-s "$BUDGET" "$@"
RC=$?

# Worker process groups still alive (only when the check itself was killed hard).
if [ -s "$PGIDS" ]; then
  while read -r pg; do
    if [ -n "$pg" ] && kill -0 -- "-$pg" 2>/dev/null; then
      kill -KILL -- "-$pg" 2>/dev/null
    fi
  done < "$PGIDS"
fi
rm -f "$PGIDS"

if [ -f "$OUT/gpu_check.json" ]; then
  echo "run_gpu_check: exit status $RC; results in $OUT/gpu_check.json and $OUT/summary.md"
  exit 0
fi
printf '{"status": "no result", "exit_code": %d, "note": "the check wrote no JSON; see the command output"}\n' \
  "$RC" > "$OUT/gpu_check.json"
echo "run_gpu_check: the check wrote no JSON (exit status $RC)" >&2
exit 1
