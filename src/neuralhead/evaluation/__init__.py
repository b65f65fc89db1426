"""Evaluation: image and parameter metrics on held-out frames, with baselines."""
