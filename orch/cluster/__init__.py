"""Cluster descriptions from the machines themselves: ``orch cluster detect`` and its helpers."""
