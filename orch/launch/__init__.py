"""``orch launch``: a torchrun front end that validates the config and plan before spawning."""
