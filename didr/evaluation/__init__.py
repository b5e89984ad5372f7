"""Sampling, per-image metrics and fidelity statistics of teachers and one-step generators."""
