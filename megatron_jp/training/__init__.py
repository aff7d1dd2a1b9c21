"""The training loop, optimizer, schedules, checkpoints and metrics."""
