"""Training: config, data, distributed setup, the loop and checkpoints."""
