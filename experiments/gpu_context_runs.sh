#!/usr/bin/env bash
# Issue 18's context rows (bench_context.py), one process per framework and length, in the order
# given, appended to OUT_DIR/context.jsonl under one CALL id. A run is FRAMEWORK:SEQ or
# FRAMEWORK:SEQ:REMAT (qlora_jax's remat policy; default `auto`, which picks offload_attention or
# offload by the host's memory). Lengths from 262,144 run one step after the compile, no warm-up
# (a step takes minutes). Steps that take minutes do not fit one 10-minute device command: run
# this as a lane of gpu_lanes.sh, which keeps it going between commands.
#   usage: CALL=<id> experiments/gpu_context_runs.sh OUT_DIR FRAMEWORK:SEQ[:REMAT]...
set -uo pipefail
out=$(realpath -m "$1")
shift
: "${CALL:?set CALL: every run of one call shares it}"
cd "$(dirname "$0")"
for run in "$@"; do
  IFS=: read -r framework seq remat <<<"$run"
  flags=(--remat "${remat:-auto}")
  ((seq >= 262144)) && flags+=(--warmup 0)
  echo "$(date +%T) start $run ${flags[*]}"
  python3 bench_context.py --seqs "$seq" --frameworks "$framework" "${flags[@]}" --call "$CALL" --out "$out"
  echo "$(date +%T) done $run rc=$?"
done
