"""The training engine: one loop for every model, on one CPU or many GPUs (torchrun DDP)."""
