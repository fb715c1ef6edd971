#!/usr/bin/env bash
# Issue 18's throughput rows as one call on one GPU, cut into stages that each fit the device tool's
# 10-minute command limit (the full throughput set took longer than 10 minutes on 2026-11-27).
# Run the stages in order on the same warm machine with one CALL id, then append
# OUT/throughput.jsonl to experiments/results/ and run plot_throughput.py. On a machine of several
# GPUs, run stages as lanes of experiments/gpu_lanes.sh beside the context runs
# (experiments/gpu_context_runs.sh); a machine is held at most 30 minutes.
#   usage: CALL=<id> experiments/gpu_issue18.sh STAGE OUT_DIR      STAGE: 1 to 5
set -uo pipefail
stage=$1 out=$2
call=${CALL:?set CALL: every stage of one call shares it}
cd "$(dirname "$0")"
# qlora_jax's defaults (configs/base.py): remat auto, AdamW state and the token table in host memory
# (looked up there), the head on the device
ours=(--remat auto --offload 1 --loss_chunk 256 --offload_embeddings 1)
all=(--frameworks qlora_jax,unsloth,torch)
run() { python3 "$@" --call "$call" --out "$out"; }
case $stage in
  1) run bench_throughput.py --shapes smollm2-135m:8x512,llama2-7b:1x2048 "${all[@]}" "${ours[@]}" ;;
  2) run bench_throughput.py --shapes llama2-7b:4x2048,llama3-8b:1x2048 "${all[@]}" "${ours[@]}" ;;
  # the other table placements: both on the device; both in host memory (model.offload_head too)
  3) for tables in "--offload_embeddings 0" "--offload_head 1"; do
       run bench_throughput.py --shapes llama2-7b:1x2048,llama2-7b:4x2048,llama3-8b:1x2048 \
         --frameworks qlora_jax "${ours[@]}" $tables
     done ;;
  # 70B at 2,048 tokens: the row of all three frameworks with both tables in host memory, 4 dequantization
  # slices and the per-leaf AdamW update (6675460), then ours without slices. Unsloth and PyTorch
  # load a random 4-bit checkpoint that bench_models.py writes first (its bf16 weights fit no GPU).
  # The MLP tiles of 1,024 and 512 tokens (call issue18-x4b-9cb5936) did not move the peak.
  4) run bench_throughput.py --shapes llama2-70b:1x2048 "${all[@]}" --steps 3 --warmup 2 \
       --dequant_slices 4 "${ours[@]}" --offload_head 1
     run bench_throughput.py --shapes llama2-70b:1x2048 --frameworks qlora_jax --steps 3 --warmup 2 \
       "${ours[@]}" --offload_head 1 ;;
  # offload instead of recompute, every matmul operand on the host (remat_policy=offload_all)
  5) run bench_throughput.py --shapes llama2-7b:1x2048,llama2-7b:4x2048,llama3-8b:1x2048 \
       --frameworks qlora_jax "${ours[@]}" --remat offload_all ;;
  *) echo "stage $stage: valid stages are 1 to 5" >&2; exit 2 ;;
esac
