"""Training: config, schedule, loop."""
