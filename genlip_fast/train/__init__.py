"""Training: config, FSDP2 trainer, checkpoints, FLOP counting, export."""
