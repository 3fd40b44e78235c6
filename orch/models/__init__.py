"""Reference Llama-style dense and MoE decoders built from orch layers."""

from orch.models.llama import Transformer
from orch.models.moe import MoEFeedForward

__all__ = ["MoEFeedForward", "Transformer"]
