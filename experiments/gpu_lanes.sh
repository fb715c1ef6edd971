#!/usr/bin/env bash
# Several benchmark commands at once on one multi-GPU machine, one GPU ("lane") each, in their own
# process session so they outlive the device tool's 10-minute commands. `start` launches the lanes
# and returns; `wait` sleeps while any lane runs (keeping the machine warm), then gathers what the
# lanes wrote so far into OUT: throughput.jsonl and context.jsonl (all lanes' rows), each lane's
# other JSON results bundled in OUT/laneGPU.json ({file name: its JSON, a .jsonl as a list of
# rows}: the device tool returns at most 8 files, and a buffer dump was lost to that limit on
# 2026-11-28), and lanes.log.
# Each lane's command sees CUDA_VISIBLE_DEVICES=GPU and LANE_OUT, its own results folder, and runs
# in a copy of the repository taken at `start`, first on PYTHONPATH: the device tool re-copies the
# working tree at each command, and a lane process started during that copy found its script
# missing (2026-11-28).
# The saved random models and compilation cache (experiments/.bench_models) are shared by all.
# Keep the commands back to back: a machine idle for its release time (30 s) is given back, and
# its lanes end with it.
#   usage: experiments/gpu_lanes.sh start GPU 'COMMAND' [GPU 'COMMAND' ...]
#          experiments/gpu_lanes.sh wait SECONDS OUT
set -uo pipefail
work=/tmp/gpu_lanes
case ${1:-} in
  start)
    shift
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tree=$work/tree-$(date +%s)
    mkdir -p "$tree" "$work/bench_models"
    tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./experiments/.bench_models -cf - . | tar -C "$tree" -xf -
    ln -sfn "$work/bench_models" "$tree/experiments/.bench_models"
    while (($# >= 2)); do
      gpu=$1 command=$2
      shift 2
      mkdir -p "$work/lane$gpu"
      CUDA_VISIBLE_DEVICES=$gpu LANE_OUT=$work/lane$gpu PYTHONPATH=$tree${PYTHONPATH:+:$PYTHONPATH} setsid bash -c \
        "cd $tree && $command; echo \"\$(date +%T) lane finished\"" >"$work/lane$gpu.log" 2>&1 </dev/null &
      echo "lane $gpu started: $command"
    done
    ;;
  wait)
    seconds=$2 out=$3
    end=$((SECONDS + seconds))
    running() { [[ -n $(grep -L "lane finished" "$work"/lane*.log 2>/dev/null) ]]; }
    while ((SECONDS < end)) && running; do sleep 10; done
    shopt -s nullglob
    for kind in throughput context; do
      rows=("$work"/lane*/"$kind".jsonl)
      ((${#rows[@]})) && cat "${rows[@]}" >"$out/$kind.jsonl"
    done
    for lane in "$work"/lane*/; do  # the lanes' other results (JSON: smoke, traces, parity checks)
      python3 - "$lane" "$out/$(basename "$lane").json" <<'BUNDLE'
import glob, json, os, sys
lane, target = sys.argv[1:]
bundle = {}
for path in sorted(glob.glob(os.path.join(lane, "*.json")) + glob.glob(os.path.join(lane, "*.jsonl"))):
    name = os.path.basename(path)
    if name in ("throughput.jsonl", "context.jsonl"):
        continue
    with open(path) as f:
        text = f.read()
    try:
        if name.endswith(".jsonl"):
            bundle[name] = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            bundle[name] = json.loads(text)
    except ValueError:
        bundle[name] = text  # a file cut short by a lane still writing: kept as text
if bundle:
    with open(target, "w") as f:
        json.dump(bundle, f)
BUNDLE
    done
    for log in "$work"/lane*.log; do echo "=== $log"; tail -c 100000 "$log"; done >"$out/lanes.log"
    for log in "$work"/lane*.log; do echo "=== $log"; tail -n 6 "$log"; done
    ;;
  *) echo "usage: $0 start GPU 'COMMAND' ... | wait SECONDS OUT" >&2; exit 2 ;;
esac
