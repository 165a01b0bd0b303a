"""Training: data, optimizer, step, reliability, run checkpoints, train.py end to end."""
