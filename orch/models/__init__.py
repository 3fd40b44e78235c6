"""Reference Llama-style dense and MoE decoders built from orch layers."""
