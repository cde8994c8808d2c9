"""The toy text-to-image world: a procedural shapes dataset, its checker, tokenizers built from its
captions, and tiny pipeline folders that train and sample through the same code as the full models."""
