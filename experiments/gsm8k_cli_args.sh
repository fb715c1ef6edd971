# The training CLI's arguments shared by the GPU CLI runs (gpu_cli_8b.sh, gpu_cli_memory.sh):
# the llama3-8b recipe with a saved tokenizer and GSM8K's question/answer rows as chat. Sourced
# with $tok (tokenizer directory) and $data (the directory of train.jsonl and test.jsonl) set.
gsm8k_cli_args=(--config configs/llama3_8b.py --config.model.tokenizer="$tok"
  --config.data.train_path="$data/train.jsonl" --config.data.eval_path="$data/test.jsonl"
  --config.data.format=chat --config.data.prompt_key=question --config.data.completion_key=answer)
