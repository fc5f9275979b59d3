"""sae_dist.parallel"""
