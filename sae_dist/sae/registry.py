"""Registry of SAE architectures: the Hydra option `sae=<name>` -> its `SparseAutoencoder` class.

Classes are imported lazily ("module:Class" strings), so the registry can be read (e.g. by
`SAEConfig` to validate a name) without importing every architecture.
"""

from __future__ import annotations

import importlib

__all__ = ["ARCHITECTURES", "architecture_class", "build_sae"]

#: name -> "module:Class". The names are the conf/sae/<name>.yaml files.
ARCHITECTURES: dict[str, str] = {
    "topk": "sae_dist.sae.topk:TopKSAE",
    "relu": "sae_dist.sae.relu:ReLUSAE",
    "prolu": "sae_dist.sae.prolu:ProLUSAE",
    "jumprelu": "sae_dist.sae.jumprelu:JumpReLUSAE",
    "batchtopk": "sae_dist.sae.batchtopk:BatchTopKSAE",
    "matryoshka": "sae_dist.sae.matryoshka:MatryoshkaSAE",
    "tree": "sae_dist.sae.tree:TreeSAE",
    "soft_topk": "sae_dist.sae.soft_topk:SoftTopKSAE",
}


def architecture_class(name: str):
    """The SparseAutoencoder subclass registered as `name`; ValueError listing the valid names."""
    if name not in ARCHITECTURES:
        raise ValueError(f"sae={name!r} is not an architecture; valid: {', '.join(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_sae(cfg, device="cpu", generator=None):
    """The (whole, single-process) SAE of `cfg.architecture` for SAEConfig `cfg` on `device`."""
    return architecture_class(cfg.architecture)(cfg, device=device, generator=generator)
