"""Reading and writing model weights, adapters and checkpoints."""
