"""Training: batches, the engine's loop, the quality gate and the live/trained weights."""
