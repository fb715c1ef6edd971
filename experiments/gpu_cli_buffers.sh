#!/usr/bin/env bash
# Where the training CLI's step needs more device memory than the bench's row of the same shape
# (issue 18: llama3-8b, r=64, remat full, tables on the device, 1 x 2048): one CLI step on packed GSM8K rows and one
# bench step, each with XLA's buffer assignment dumped, summarized by top_buffers.py into
# OUT/top_buffers_cli.json and OUT/top_buffers_bench.json, with each step's whole buffer assignment
# gzipped beside them (buffer_assignment_{cli,bench}.txt.gz: which values are live at the peak).
# Two GPUs, one each, at once (the same GPU twice works too: the plans are compile-time).
#   usage: experiments/gpu_cli_buffers.sh TOKENIZER_DIR GSM8K_DIR OUT_DIR GPU_CLI GPU_BENCH
set -uo pipefail
tok=$1 data=$2 out=$3
here=$(dirname "$0")
source "$here/gsm8k_cli_args.sh"
dump="--xla_dump_hlo_as_text --xla_dump_to"
(
  # a compilation cache of its own: a step loaded from the cache is not compiled, so not dumped
  CUDA_VISIBLE_DEVICES=$4 XLA_FLAGS="$dump=/tmp/dump_cli" JAX_COMPILATION_CACHE_DIR=$(mktemp -d) \
    python3 -m qlora_jax.train "${gsm8k_cli_args[@]}" \
    --config.data.max_seq_len=2048 --config.data.packing=True --config.train.batch_size=1 --config.lora.dropout=0.0 \
    --config.model.offload_embeddings=False \
    --config.train.max_steps=2 --config.train.eval_every=0 --config.train.eval_batches=1 \
    --config.train.exact_match_examples=0 --config.output_dir=/tmp/cli_buffers >"$out/cli_buffers.log" 2>&1
  python3 "$here/top_buffers.py" /tmp/dump_cli --module state_step --top 25 >"$out/top_buffers_cli.json"
  cat /tmp/dump_cli/*state_step*after_optimizations-buffer-assignment.txt | gzip >"$out/buffer_assignment_cli.txt.gz"
) &
(
  CUDA_VISIBLE_DEVICES=$5 XLA_FLAGS="$dump=/tmp/dump_bench" python3 "$here/bench_throughput.py" \
    --shapes llama3-8b:1x2048 --frameworks qlora_jax --r 64 --remat full --offload 1 --loss_chunk 256 \
    --steps 1 --warmup 0 --out /tmp/bench_buffers >"$out/bench_buffers.log" 2>&1
  python3 "$here/top_buffers.py" /tmp/dump_bench --module update --top 25 >"$out/top_buffers_bench.json"
  cat /tmp/dump_bench/*jit_update*after_optimizations-buffer-assignment.txt | gzip >"$out/buffer_assignment_bench.txt.gz"
) &
wait
