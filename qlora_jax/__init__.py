"""qlora_jax: QLoRA fine-tuning of LLaMA-family models in JAX, interchangeable with bitsandbytes + peft."""

__version__ = "0.1.0"
