"""sae-dist: train very wide TopK sparse autoencoders on language-model activations.

Public API (ARCHITECTURE.md CONTRACT): `load_sae(path)` and `sae_dist.store.write_store(...)`.
"""

__version__ = "0.1.0"


def load_sae(path, device="cpu"):
    """Load an exported SAE directory (`cfg.json` + `sae_weights.safetensors`); see `sae_dist.sae.load_sae`."""
    from sae_dist.sae.export import load_sae as _load

    return _load(path, device=device)


__all__ = ["load_sae", "__version__"]
