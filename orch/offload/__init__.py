"""Memory tiers: parameters, gradients and optimizer states at home off the device, brought to
it a layer at a time within a byte budget (:mod:`orch.offload.engine`)."""
