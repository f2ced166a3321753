"""Training: optimizer, sharded step, checkpoints, metrics and the loop."""
