"""What the sharded-export tests (test_parallel_export.py in tests/unit/parallel/, test_parallel_export_gloo.py
in tests/integration/parallel/) share: the normalize modes and the tiny write buffer they export with, a
recorder of every torch op's allocation, random global weights and scale, the export's arguments, and the
check that an export wrote the same files as `export_sae`. Random draws go through the generator a test
passes in."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.dist import NAMES

MODES = ("layer_norm", "scalar", "none")
BUF = 24  # bytes: 6 floats, smaller than one row of a W_enc or W_dec shard, so every path is chunked


class AllocRecorder(TorchDispatchMode):
    """Records the output bytes and shapes of every torch op that is not a view."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.sizes.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
        return out


def global_weights(d, n, g):
    """Random global weights of a d x n TopK SAE: W_enc, b_enc, unit-norm W_dec rows, b_dec."""
    W_dec = torch.randn(n, d, generator=g)
    return {"W_enc": torch.randn(d, n, generator=g) * 0.3, "b_enc": torch.randn(n, generator=g) * 0.2,
            "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True), "b_dec": torch.randn(d, generator=g)}


def random_scale(g) -> float:
    """A random normalization scale in [0.1, 3.1)."""
    return float(torch.rand((), generator=g)) * 3 + 0.1


def export_kwargs(mode, scale):
    """The export arguments after the model: hook, model name, `mode`, `scale` (with "scalar" only), extra cfg."""
    return dict(hook_name="blocks.3.hook_resid_post", model_name="tiny-lm", normalize=mode,
                scale=scale if mode == "scalar" else None,
                extra_cfg={"context_size": 32, "dataset_path": "stdlib"})


def assert_same_export(got_dir, ref_dir, d, n):
    """The export in `got_dir` is the one in `ref_dir` (cfg.json text, every tensor, the same bytes)
    and holds nothing else; W_enc is d x n."""
    assert (got_dir / "cfg.json").read_text() == (ref_dir / "cfg.json").read_text()
    got = load_file(str(got_dir / "sae_weights.safetensors"))
    ref = load_file(str(ref_dir / "sae_weights.safetensors"))
    assert set(got) == set(NAMES) == set(ref)
    for name in NAMES:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], ref[name]), name
    with safe_open(str(got_dir / "sae_weights.safetensors"), framework="pt") as fh:
        assert fh.get_slice("W_enc").get_shape() == [d, n]
        assert torch.equal(fh.get_slice("W_enc")[:, 5:9], ref["W_enc"][:, 5:9])
    # the layout is safetensors' own: the whole file is the bytes save_file wrote
    weights = "sae_weights.safetensors"
    assert (got_dir / weights).read_bytes() == (ref_dir / weights).read_bytes()
    assert sorted(os.listdir(got_dir)) == ["cfg.json", "sae_weights.safetensors"]


def saelens_topk_forward(tensors: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens TopKSAE.forward on the exported files, written from its definition: optional
    layer_norm in (x - mu) / (std + 1e-5) (unbiased std), (x - b_dec) W_enc + b_enc, TopK + ReLU,
    z W_dec + b_dec, layer_norm out y * std + mu."""
    x = x.double()
    W_enc, b_enc, W_dec, b_dec = (tensors[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        x = xc / (std + 1e-5)
    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    y = z @ W_dec + b_dec
    if cfg["normalize_activations"] == "layer_norm":
        y = y * std + mu
    return y
