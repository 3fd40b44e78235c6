"""Device meshes from a plan, and the parallelisms applied to a model on them."""
