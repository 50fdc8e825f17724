"""t5x_like: train entry, trainer, checkpoints, data and tasks."""
