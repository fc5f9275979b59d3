"""Triton kernels with torch references (installed as sae_dist.kernels)."""
