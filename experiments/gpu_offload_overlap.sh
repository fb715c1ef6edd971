#!/usr/bin/env bash
# Issue 18: do the offloaded layer inputs' copies overlap the step's kernels? In a traced Llama-2-7B
# 4 x 2048 step (call issue21-2gpu-reduce-once) ~39 ms of host-to-device and ~39 ms of
# device-to-host copies sat on the compute stream, 12% of the 670 ms step. One GPU: the same step
# (remat auto = offload, AdamW state offloaded) traced under XLA flags that may move them off it,
# one row each in OUT/scaling.jsonl with the flags as its label, and the optimized HLO's
# host-memory instructions of the default, the first variant and the layer-by-layer model in
# OUT/host_transfers_*.json.
#   usage: experiments/gpu_offload_overlap.sh OUT_DIR [CALL]
set -uo pipefail
out=$1 call=${2:-offload-overlap}
here=$(dirname "$0")
step=(--preset llama2-7b --per_device_batch 4 --seq 2048 --layouts 1:data=1 --remat auto --offload_state 1)
variants=(
  ""
  "--xla_disable_hlo_passes=fusion-dynamic-memcpy-rewriter"
  "--xla_gpu_enable_while_loop_double_buffering=true"
  "--xla_disable_hlo_passes=fusion-dynamic-memcpy-rewriter --xla_gpu_enable_while_loop_double_buffering=true"
)
for i in "${!variants[@]}"; do
  flags=${variants[$i]}
  dump=""
  if [ "$i" -lt 2 ]; then dump="--xla_dump_to=/tmp/hlo_$i --xla_dump_hlo_as_text"; fi
  XLA_FLAGS="$flags $dump" python3 "$here/bench_scaling.py" "${step[@]}" --profile 1 \
    --label "XLA_FLAGS=${flags:-default}" --call "$call" --out "$out" >"$out/offload_overlap_$i.log" 2>&1
  echo "variant $i (${flags:-default}): exit $?"
  if [ -n "$dump" ]; then
    python3 "$here/hlo_host_transfers.py" "/tmp/hlo_$i" >"$out/host_transfers_$i.json"
  fi
done
# the layers one after another (model.scan_layers=False): no loop, so each layer's offloaded input
# is an array of its own, moved by a plain copy between memory spaces, as the offloaded AdamW
# state is (whose copies ran on streams of their own in that trace). Compiles every layer.
XLA_FLAGS="--xla_dump_to=/tmp/hlo_unrolled --xla_dump_hlo_as_text" python3 "$here/bench_scaling.py" \
  "${step[@]}" --scan_layers 0 --profile 1 --label "scan_layers=0 (layer by layer)" --call "$call" --out "$out" \
  >"$out/offload_overlap_unrolled.log" 2>&1
echo "layer by layer: exit $?"
python3 "$here/hlo_host_transfers.py" /tmp/hlo_unrolled >"$out/host_transfers_unrolled.json"
