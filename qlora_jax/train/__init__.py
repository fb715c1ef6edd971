"""Training: optimizer (with host offload), loss, the jitted step, the loop and the CLI."""
