"""What the training loop uses: validation and early stopping, checkpoints, the flat optimizer."""
