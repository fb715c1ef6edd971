"""Data: loading rows, formatting and tokenizing them with loss masks, packing into fixed shapes."""
