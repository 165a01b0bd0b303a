"""Training: data and tokenizer, optimizer, the jitted train step and its LM loss, reliability guards, run
checkpoints and logs."""
