"""The architecture interface across every registered architecture (`sae_dist.sae.registry`): each has
its Hydra config, builds from it, and its export loads back (`sae_dist.load_sae`) to a module that
computes what the training module computes, on fresh random weights and inputs. The per-architecture
ground-truth tests live in tests/unit/sae/test_arch_<name>.py (TopK: tests/unit/eval/test_synthetic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_dist import CONF_DIR
from sae_dist.cli import sae_config_from
from sae_dist.sae.base import SparseAutoencoder
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae, load_sae
from sae_dist.sae.registry import ARCHITECTURES, architecture_class, build_sae

CONF = Path(CONF_DIR) / "sae"


def _sae_node(name: str):
    """The composed `sae` node of `sae=<name>` (its schema, sae_dist.config.SAE_<name>, + conf/sae/<name>.yaml)."""
    from hydra import compose, initialize_config_dir

    import sae_dist.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"sae={name}"]).sae


def _cfg(name: str, d_in: int, **over) -> SAEConfig:
    node = _sae_node(name)
    node.d_sae = 64
    if node.get("k") is not None:
        node.k = 4
    for key, val in over.items():
        node[key] = val
    return sae_config_from(node, d_in=d_in)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_config_builds_the_registered_class(name):
    cfg = _cfg(name, 24)
    assert cfg.architecture == name
    sae = build_sae(cfg)
    cls = architecture_class(name)
    assert type(sae) is cls and isinstance(sae, SparseAutoencoder) and cls.architecture == name
    assert sae.W_dec.shape == (64, 24) and sae.W_enc.shape == (24, 64)
    assert name == "topk" or not cls.shardable  # only TopK shards over tp (the trainer refuses the rest)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("normalize", ["none", "scalar"])
def test_export_reproduces_the_training_module(name, normalize, tmp_path):
    """load_sae(export(sae)) on RAW x equals the training module on the normalised x = s * raw,
    reconstruction divided by s (docs/formats.md#sae-export: normalisation folded into the exported weights)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    sae = build_sae(_cfg(name, 24, normalize=normalize))
    with torch.no_grad():  # non-trivial biases and thresholds
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        for p_name, p in sae.named_parameters():
            if p_name not in ("W_enc", "b_enc", "W_dec", "b_dec"):
                p.add_(0.05 * torch.rand_like(p))
    sae.eval()
    s = 0.5 + torch.rand(()).item() if normalize == "scalar" else None
    export_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post", model_name="m",
               normalize=normalize, scale=s)
    loaded = load_sae(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == loaded.architecture == sae.export_architecture
    raw = 2.0 * torch.randn(50, 24)
    x = raw * (s or 1.0)
    with torch.no_grad():
        z = sae.encode(x)
        z_l = loaded.encode(raw)
        x_hat = sae.decode(z)
        x_hat_l = loaded(raw)
    torch.testing.assert_close(z_l * (s or 1.0), z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat_l * (s or 1.0), x_hat, rtol=1e-4, atol=1e-4)
    assert (z != 0).any() and (z >= 0).all()
    norms = loaded.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-4, atol=1e-4)


def test_bad_names_are_named():
    with pytest.raises(ValueError, match="valid: topk, relu"):
        SAEConfig(d_in=8, d_sae=16, k=2, architecture="gated")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['l1_cof'\]"):
        build_sae(SAEConfig(d_in=8, d_sae=16, k=None, architecture="relu", options={"l1_cof": 1.0}))
    with pytest.raises(ValueError, match="needs sae.k|must be a positive int"):
        SAEConfig(d_in=8, d_sae=16, k=None, architecture="batchtopk")
