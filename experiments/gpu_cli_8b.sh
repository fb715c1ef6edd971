#!/usr/bin/env bash
# Issue 16's three commands on one GPU, as a new user runs them: llama3-8b (random weights, NF4,
# the QLoRA paper recipe with its offloaded AdamW state) on GSM8K with the SmolLM2 tokenizer.
# Run A checkpoints mid-run (crashed at its first checkpoint before the fix); run B trains 20
# steps, then resumes to 30 (refused before the fix: the base's fingerprint changed per process).
#   usage: experiments/gpu_cli_8b.sh TOKENIZER_DIR GSM8K_DIR OUT_DIR
set -uo pipefail
tok=$1 data=$2 out=$3
runs=$(mktemp -d)
source "$(dirname "$0")/gsm8k_cli_args.sh"
common=("${gsm8k_cli_args[@]}" --config.data.max_seq_len=1024 --config.train.batch_size=4 --config.train.log_every=5
  --config.train.eval_every=0 --config.train.eval_batches=4 --config.train.exact_match_examples=0)
step() {  # name, then the run's own overrides; the log goes to $out/<name>.log
  local name=$1; shift
  python3 -m qlora_jax.train "${common[@]}" "$@" >"$out/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code; $(grep -E '^(done|resumed|error)' "$out/$name.log" | tr '\n' ' ')"
}
step run_a --config.train.max_steps=20 --config.checkpoint.every=10 --config.output_dir="$runs/run"
step run_b --config.train.max_steps=20 --config.checkpoint.every=20 --config.output_dir="$runs/run_b"
step run_b_resumed --config.train.max_steps=30 --config.checkpoint.every=20 --config.output_dir="$runs/run_b" \
  --config.resume=auto
tail -n 3 "$runs/run_b/metrics.jsonl" >"$out/run_b_last_metrics.jsonl"
