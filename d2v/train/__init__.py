"""The training loop: DeepSpeed engine, EMA teacher update, logging and checkpoints."""
