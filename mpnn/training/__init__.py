"""Loss, metrics, optimiser, checkpoints and the training loop."""
