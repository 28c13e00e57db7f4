"""Training: ``Train`` (the multi-stage scheduler), stage building, step runners (TensorFlow, JAX), the epoch loop, callbacks, run files and recipes."""
