#!/usr/bin/env bash
# Issue 18's measurements as one call on one GPU, cut into stages that each fit the device tool's
# 10-minute command limit (the full throughput set took longer than 10 minutes on 2026-11-27).
# Run the stages in order on the same warm machine with one CALL id, then append
# OUT/throughput.jsonl and OUT/context.jsonl to experiments/results/ and run plot_throughput.py
# and plot_context.py.
#   usage: CALL=<id> experiments/gpu_issue18.sh STAGE OUT_DIR      STAGE: 1 to 8
# Stages 6 and 7 train 262,144 and 342,733 tokens with remat=offload: offload_attention would keep
# twice the host memory (2 x 84 GiB of layer inputs and attention residuals at 342,733 tokens of
# Llama-3-8B), more than the 128 GiB of these machines.
set -uo pipefail
stage=$1 out=$2
call=${CALL:?set CALL: every stage of one call shares it}
cd "$(dirname "$0")"
ours=(--remat auto --offload 1 --loss_chunk 256)
all=(--frameworks qlora_jax,unsloth,torch)
run() { python3 "$@" --call "$call" --out "$out"; }
case $stage in
  1) run bench_throughput.py --shapes smollm2-135m:8x512,llama2-7b:1x2048 "${all[@]}" "${ours[@]}" ;;
  2) run bench_throughput.py --shapes llama2-7b:4x2048,llama3-8b:1x2048 "${all[@]}" "${ours[@]}" ;;
  3) run bench_throughput.py --shapes llama2-7b:1x2048,llama2-7b:4x2048,llama3-8b:1x2048 \
       --frameworks qlora_jax --offload_embeddings 1 "${ours[@]}" ;;
  4) run bench_context.py --seqs 16384,32768,65536,131072 --frameworks qlora_jax ;;
  5) run bench_context.py --seqs 16384,32768,65536,131072 --frameworks unsloth ;;
  6) run bench_context.py --seqs 262144,342733 --frameworks qlora_jax --remat offload --warmup 0 ;;
  7) run bench_context.py --seqs 262144,342733 --frameworks unsloth --warmup 0 ;;
  8) run bench_throughput.py --shapes llama2-70b:1x2048 --frameworks qlora_jax --steps 3 --warmup 2 \
       --dequant_slices 4 --offload_embeddings 1 "${ours[@]}" ;;
  *) echo "stage $stage: valid stages are 1 to 8" >&2; exit 2 ;;
esac
