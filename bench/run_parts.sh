#!/usr/bin/env bash
# Run every single-init part of a quality preset side by side (one GPU is mostly idle during one
# pipeline run), in the preset's priority order, then leave aggregation to
# `python bench/quality.py --preset PRESET --aggregate-only`.
#   bench/run_parts.sh PRESET [WORKERS] [RUNS_DIR] [JOBS_FILE]
# JOBS_FILE: lines "seed lr init" (a subset of `quality.py --plan-jobs`) to run instead of the whole plan.
# Logs go to RUNS_DIR/quality-PRESET/logs/; a part that fails is reported there and the others go on.
set -uo pipefail
PRESET=${1:?usage: bench/run_parts.sh PRESET [WORKERS] [RUNS_DIR]}
WORKERS=${2:-8}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUNS=${3:-$HERE/runs}
JOBS=${4:-}
LOGS="$RUNS/quality-$PRESET/logs"
mkdir -p "$LOGS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
{ if [ -n "$JOBS" ]; then cat "$JOBS"; else python3 "$HERE/quality.py" --preset "$PRESET" --plan-jobs; fi; } |
  xargs -P "$WORKERS" -L 1 sh -c 'python3 "$0" --preset "$1" --runs "$2" --seeds "$4" --lr "$5" --inits "$6" --no-write \
      > "$3/$4-$5-$6.log" 2>&1 && echo "done $4 $5 $6" || echo "FAILED $4 $5 $6 (see $3/$4-$5-$6.log)"' \
      "$HERE/quality.py" "$PRESET" "$RUNS" "$LOGS"
