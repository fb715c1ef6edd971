"""The same fine-tune in qlora_jax and in transformers + peft (+ bitsandbytes), step by step.

Needs PyTorch, transformers, peft and bitsandbytes (the `test` extra); the core package does not.
"""
