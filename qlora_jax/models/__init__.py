"""The LLaMA-family decoder: config, named shapes, RoPE, the linear layer and the Flax model."""
