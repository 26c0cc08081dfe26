#!/usr/bin/env bash
# One self-contained call on a lent GPU machine: run quality-study parts side by side, stop at a
# deadline, and pack every FINISHED part (results.json, config.yaml, manifest.json) plus the logs
# into $OUT/parts.tgz, so results come back even when the machine is taken back right after.
#   bash bench/gpu_batch.sh PRESET JOBS_FILE [DEADLINE_S] [WORKERS] [SRC_ROOT]
# JOBS_FILE: lines "seed lr init" (a subset of `python bench/quality.py --preset PRESET --plan-jobs`).
# SRC_ROOT: a copy of the repository's src/ and bench/ to run from (default: this checkout), e.g. a
# snapshot carried in .gpu/snap so that edits made meanwhile cannot change a running study.
# Afterwards, here: extract parts.tgz under bench/runs/quality-PRESET/ and run
#   python bench/quality.py --preset PRESET --aggregate-only
set -uo pipefail
PRESET=${1:?usage: bench/gpu_batch.sh PRESET JOBS_FILE [DEADLINE_S] [WORKERS] [SRC_ROOT]}
JOBS=$(realpath "${2:?jobs file}")
DEADLINE=${3:-540}
WORKERS=${4:-8}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC_ROOT=$(realpath "${5:-$HERE/..}")
OUT=${OUT:-/tmp/gpu-batch-out}
mkdir -p "$OUT"
# shellcheck source=/dev/null
source "$HERE/gpu_env.sh"
export PYTHONPATH="$SRC_ROOT/src"
RUNS=$(mktemp -d /tmp/gpu-batch-runs.XXXX)
T0=$(date +%s)
( while sleep 20; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$RUNS/util.log" 2>/dev/null; done ) &
SAMPLER=$!
bash "$SRC_ROOT/bench/run_parts.sh" "$PRESET" "$WORKERS" "$RUNS" "$JOBS" > "$RUNS/parts.log" 2>&1 &
PID=$!
while kill -0 "$PID" 2>/dev/null; do
  if [ $(( $(date +%s) - T0 )) -ge "$DEADLINE" ]; then echo "deadline of ${DEADLINE} s reached: packing the finished parts"; break; fi
  sleep 5
done
kill "$SAMPLER" 2>/dev/null
echo "elapsed $(( $(date +%s) - T0 )) s"
cat "$RUNS/parts.log"
[ -f "$RUNS/util.log" ] && echo "GPU utilisation samples: $(wc -l < "$RUNS/util.log"), last: $(tail -1 "$RUNS/util.log")"
cd "$RUNS/quality-$PRESET" || { echo "no part started"; exit 1; }
FILES=()
for d in seed*/; do
  [ -f "$d/results.json" ] && FILES+=("$d/results.json" "$d/config.yaml" "$d/manifest.json")
done
echo "finished parts: $(( ${#FILES[@]} / 3 ))"
tar czf "$OUT/parts.tgz" "${FILES[@]}" logs
ls -la "$OUT"
