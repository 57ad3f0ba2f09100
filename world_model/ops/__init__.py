"""Numerical operators of the model. Nothing here imports Triton or flash-linear-attention at module level."""
