"""The training loop, checkpoints, logging and the end-of-run report."""
