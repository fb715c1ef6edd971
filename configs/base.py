"""Defaults shared by every recipe: each value grouped by concern, with what it means.

Recipes import `base_config()` and change what differs. Keys documented in the README are the
public contract (model.path, lora.r, data.train_path, train.batch_size, optim.lr, ...).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF directory, .gguf file, or preset name (random init); "" = embedded SmolLM2
    c.model.tokenizer = ""  # tokenizer source when model.path is a preset; "" = same as model.path
    c.model.quantization = "nf4"  # nf4 | fp4 | none (frozen linear weights)
    c.model.block_size = 64  # 4-bit block (bitsandbytes' default)
    c.model.double_quant = True  # quantize the block scales too (QLoRA)
    c.model.dtype = "bfloat16"  # compute dtype and storage of embeddings / dense weights
    # auto | none | full | offload | offload_attention | offload_all | dots_saveable |
    # dots_with_no_batch_dims_saveable (README: Memory and long context)
    c.model.remat_policy = "auto"
    c.model.seq_tile = 8192  # MLP over tiles of this many tokens when longer (long context); 0 = never
    c.model.dequant_slices = 1  # > 1: each NF4 weight dequantized in this many slices (less memory)
    # the token embedding table kept in pinned host memory and looked up there (each batch brings
    # its rows): its size less device memory (Llama 3: 1 GiB); README: Memory and long context
    c.model.offload_embeddings = True
    # the output head too, copied to the device for the loss: its size less device memory again
    # for 4-15% of the speed (README: Memory and long context); a tied table counts as the head
    c.model.offload_head = False

    c.lora = ml_collections.ConfigDict()
    c.lora.r = 16  # adapter rank
    c.lora.alpha = 32.0  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
    c.lora.dropout = 0.05  # dropout on the adapter input (peft's lora_dropout)
    c.lora.target_modules = "all-linear"  # "all-linear", comma-separated names, or a regex
    c.lora.bias = "none"  # none | all | lora_only
    c.lora.use_rslora = False
    c.lora.init = "default"  # default (kaiming-uniform A, zero B) | gaussian

    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""  # json/jsonl/csv/parquet/txt file, dataset dir or name, builtin:addition
    c.data.eval_path = ""  # "" = hold out data.eval_fraction of the training rows
    c.data.eval_fraction = 0.05
    c.data.format = "prompt_completion"  # alpaca | chat | prompt_completion | text
    c.data.prompt_key = "prompt"
    c.data.completion_key = "completion"
    c.data.text_key = "text"
    c.data.messages_key = "messages"
    c.data.train_on_prompt = False  # False: loss on completions only
    c.data.max_seq_len = 512
    c.data.packing = True  # pack examples with segment ids; False: bucket by length
    c.data.max_segments_per_row = 32  # examples a packed row may hold (cuDNN packed attention's slots)
    c.data.buckets = ""  # comma-separated bucket lengths when not packing ("" = T/4, T/2, T)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # rows of max_seq_len per micro-batch
    c.train.max_steps = 1000  # optimizer steps
    c.train.log_every = 10
    c.train.eval_every = 200  # 0 = only at the end
    c.train.eval_batches = 0  # cap on eval batches (0 = all)
    c.train.seed = 0
    c.train.exact_match_examples = 0  # generate answers for this many eval rows before/after
    c.train.exact_match = "exact"  # exact | last_number (compare the last number, e.g. GSM8K)
    c.train.max_new_tokens = 16  # generation length for exact match
    c.train.loss_chunk = 256  # tokens per chunk of the fp32 cross-entropy (128k vocab: 125 MiB each)
    c.train.nonfinite = "stop"  # NaN/inf loss or gradient: stop (error naming the step) | skip the batch

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.schedule = "constant"  # constant | linear | cosine, after warmup
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 0.3  # 0 = no clipping
    c.optim.accumulation_steps = 1
    c.optim.offload_state = True  # AdamW moments in pinned host memory between steps

    c.mesh = ml_collections.ConfigDict()  # device mesh (qlora_jax/sharding.py); -1 = the rest
    c.mesh.data = -1  # data parallel: batch rows split, weights replicated
    c.mesh.fsdp = 1  # fully sharded: batch rows and frozen/LoRA/optimizer arrays split
    c.mesh.tensor = 1  # tensor parallel: weight rows (output features) split, batch not

    c.distributed = ml_collections.ConfigDict()  # multi-process (multi-host) runs
    c.distributed.mode = "auto"  # auto (SLURM / Open MPI / JAX_COORDINATOR_ADDRESS) | on | off
    c.distributed.coordinator = ""  # host:port of process 0; "" = from the environment
    c.distributed.num_processes = 0  # 0 = from the environment
    c.distributed.process_id = -1  # -1 = from the environment

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 0  # steps between train-state checkpoints (0 = off)
    c.checkpoint.keep = 3

    c.compare = ml_collections.ConfigDict()  # python -m qlora_jax.compare (qlora_jax vs transformers + peft)
    c.compare.prompts = 4  # held-out prompts both frameworks answer greedily (train.max_new_tokens long)
    c.compare.first_steps = 50  # the summary also reports |delta loss| over these first steps

    c.output_dir = "runs/default"
    c.resume = ""  # "" = fresh run; "auto" = continue from the latest checkpoint in output_dir
    c.overwrite = False  # a fresh run into an output_dir holding a run replaces it instead of refusing
    return c
