"""orch: hybrid-parallel training and offloaded fine-tuning for large PyTorch models."""

__version__ = "0.1.0"
