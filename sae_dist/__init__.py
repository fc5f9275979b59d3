"""sae-dist: train very wide TopK sparse autoencoders on language-model activations.

Public API (docs/formats.md): `load_sae(path)` and `sae_dist.store.write_store(...)`.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config tree (`conf/` in the repository, `sae_dist/conf/` in an installed wheel).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def load_sae(path, device="cpu"):
    """Load an exported SAE directory (`cfg.json` + `sae_weights.safetensors`); see `sae_dist.sae.load_sae`."""
    from sae_dist.sae.export import load_sae as _load

    return _load(path, device=device)


__all__ = ["CONF_DIR", "load_sae", "__version__"]
