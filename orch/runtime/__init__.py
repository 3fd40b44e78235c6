"""The training runtime: trainer loop, data, checkpoints, metrics and progress."""
