#!/usr/bin/env bash
# Issue 18's training-CLI run on one GPU: `python -m qlora_jax.train` on the llama3-8b preset (random
# weights, NF4, the QLoRA paper recipe: r=64, remat full, AdamW state offloaded) with the SmolLM2
# tokenizer and GSM8K packed into 1 x 2048 rows, 30 steps checkpointed every 10, then resumed to 50;
# then the bench's row of the same shape and settings (the tables in host memory, the CLI's default
# since 2026-11-28), so summary.json's peak can be read beside it.
# Dropout is 0 in both (the bench has none).
#   usage: experiments/gpu_cli_memory.sh TOKENIZER_DIR GSM8K_DIR OUT_DIR
set -uo pipefail
tok=$1 data=$2 out=$3
runs=$(mktemp -d)
source "$(dirname "$0")/gsm8k_cli_args.sh"
common=("${gsm8k_cli_args[@]}" --config.data.max_seq_len=2048 --config.data.packing=True --config.train.batch_size=1
  --config.lora.dropout=0.0 --config.train.log_every=10 --config.train.eval_every=0
  --config.train.eval_batches=2 --config.checkpoint.every=10 --config.output_dir="$runs/run")
python3 -m qlora_jax.train "${common[@]}" --config.train.max_steps=30 >"$out/cli_first30.log" 2>&1
echo "first 30 steps: exit $?"
cp "$runs/run/summary.json" "$out/cli_summary_first30.json"
python3 -m qlora_jax.train "${common[@]}" --config.train.max_steps=50 --config.resume=auto >"$out/cli_resumed50.log" 2>&1
echo "resumed to 50: exit $?; checkpoints: $(ls "$runs/run/checkpoints" 2>/dev/null | tr '\n' ' ')"
cp "$runs/run/summary.json" "$out/cli_summary_resumed50.json"
python3 experiments/bench_throughput.py --shapes llama3-8b:1x2048 --frameworks qlora_jax --r 64 \
  --remat full --offload 1 --loss_chunk 256 --offload_embeddings 1 --out "$out" --call "${CALL:-cli-memory}"
