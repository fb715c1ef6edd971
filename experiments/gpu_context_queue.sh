#!/usr/bin/env bash
# Issue 18's context rows (bench_context.py) as one queue on one GPU, run in its own process
# session so that lengths whose step takes minutes need not fit one 10-minute device command:
# `start` launches the queue and returns, `wait` sleeps while it runs (keeping the machine warm)
# and copies the rows and log so far to OUT. Each run is one framework at one length, in the
# order given; all rows share CALL. qlora_jax uses remat=offload from 262,144 tokens
# (offload_attention's host need, 2 x 64 GiB there, exceeds the 128 GiB of a one-GPU machine),
# and lengths from 262,144 run one step after the compile (a step takes minutes).
#   usage: CALL=<id> experiments/gpu_context_queue.sh start FRAMEWORK:SEQ...   (run: the queue itself)
#          experiments/gpu_context_queue.sh wait SECONDS OUT
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=/tmp/context_queue
case ${1:-} in
  start)
    shift
    : "${CALL:?set CALL: every run of one queue shares it}"
    mkdir -p "$work"
    setsid bash "$0" run "$@" >"$work/log" 2>&1 </dev/null &
    echo "queue started: $*"
    ;;
  run)
    shift
    for run in "$@"; do
      framework=${run%%:*} seq=${run##*:}
      flags=()
      if ((seq >= 262144)); then
        flags+=(--warmup 0)
        [[ $framework == qlora_jax ]] && flags+=(--remat offload)
      fi
      echo "$(date +%T) start $run ${flags[*]}"
      (cd "$here" && python3 bench_context.py --seqs "$seq" --frameworks "$framework" \
        "${flags[@]}" --call "$CALL" --out "$work")
      rc=$?
      echo "$(date +%T) done $run rc=$rc"
    done
    echo "$(date +%T) queue finished"
    ;;
  wait)
    seconds=$2 out=$3
    end=$((SECONDS + seconds))
    while ((SECONDS < end)) && ! grep -q "queue finished" "$work/log" 2>/dev/null; do sleep 10; done
    cp "$work/log" "$out/queue.log" 2>/dev/null
    cp "$work/context.jsonl" "$out/context.jsonl" 2>/dev/null
    tail -n 15 "$work/log"
    ;;
  *) echo "usage: $0 start FRAMEWORK:SEQ... | wait SECONDS OUT" >&2; exit 2 ;;
esac
