"""Quantized weight formats (bitsandbytes-compatible NF4/FP4 with double quantization)."""
