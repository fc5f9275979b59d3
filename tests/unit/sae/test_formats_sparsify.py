"""`export_sparsify`: EleutherAI sparsify (PyPI `eai-sparsify`, a test extra) loads our TopK SAEs with
`SparseCoder.load_from_disk` and gives the same latents (the selected indices where the value is > 0,
and the values) and the same reconstruction as our `load_sae` on fresh random raw activations.

Tolerances: both sides compute the same float32 encoder affine map in a different association
(sparsify: F.linear of x - b_dec; ours: (x - b_dec) @ W_enc + b_enc) and different sparse decoders
(embedding_bag vs index_add), so they agree to float rounding: 1e-5 relative to the output scale.
Where an export changes the arithmetic (b_dec folded into the encoder bias; per-token normalisation
computed by the caller) the tolerance is 1e-4 and a TopK selection may differ only on a row whose
k-th and (k+1)-th pre-activations are within 1e-4 of each other (checked, at most 2 rows).
"""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU tensors: sparsify's eager decoder
import sparsify.sparse_coder  # noqa: E402  (a test extra: CI installs it; missing -> this file fails)
from helpers.seeds import python_seed
from sparsify import SparseCoder  # noqa: E402
from sparsify.utils import eager_decode  # noqa: E402

from sae_dist.sae import SAEConfig, TopKSAE, export_sae, load_sae  # noqa: E402
from sae_dist.sae.formats import export_sparsify  # noqa: E402
from sae_dist.sae.registry import build_sae  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_sparsify_decoder(monkeypatch):
    # if another test imported sparsify before the env switch above, its Triton decoder was chosen
    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)


def _topk_sae(d, n, k, mode, seed):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize=mode), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g))
        sae.W_enc.add_(0.2 * torch.randn(d, n, generator=g) / math.sqrt(d))
    return sae


def _raw_acts(g, b, d):
    return (torch.randn(b, d, generator=g) * (0.5 + 4 * torch.rand(b, 1, generator=g))
            + 2.0 * torch.randn(d, generator=g))


def _dense(vals, idx, n):
    return torch.zeros(vals.shape[0], n).scatter_(-1, idx, vals.float())


def _compare(sc, ours, x_sparsify, x_ours, seed, *, rtol, allow_flips=0, y_map=lambda y: y):
    """sparsify model `sc` on x_sparsify vs our model on x_ours (the same tokens)."""
    n = ours.d_sae
    with torch.no_grad():
        enc = sc.encode(x_sparsify)
        z_sp = _dense(enc.top_acts, enc.top_indices, n)
        y_sp = y_map(sc.decode(enc.top_acts, enc.top_indices))
        f_sp = y_map(sc(x_sparsify).sae_out)
        vals, idx = ours.encode_sparse(x_ours)
        z = _dense(vals, idx, n)
        pre = ours._pre(ours._flat(x_ours))
        y = ours(x_ours)
    assert enc.top_indices.shape == (x_ours.shape[0], ours.k), f"seed {seed}"
    same = ((z > 0) == (z_sp > 0)).all(-1)
    flipped = (~same).nonzero().flatten()
    assert len(flipped) <= allow_flips, f"seed {seed}: {len(flipped)} rows select other latents"
    if len(flipped):
        top = pre[flipped].topk(ours.k + 1, dim=-1).values
        gap = (top[:, -2] - top[:, -1]).abs()
        assert bool((gap < 1e-4 * float(pre.abs().max())).all()), (
            f"seed {seed}: rows {flipped.tolist()} select other latents without a near-tie (gap {gap})")
    sz, sx = float(z.abs().max()), float(x_ours.abs().max())
    torch.testing.assert_close(z_sp[same], z[same], atol=rtol * sz, rtol=rtol,
                               msg=lambda m: f"seed {seed}: latents differ\n{m}")
    torch.testing.assert_close(y_sp[same], y[same], atol=rtol * sx, rtol=rtol,
                               msg=lambda m: f"seed {seed}: decode differs\n{m}")
    torch.testing.assert_close(f_sp[same], y[same], atol=rtol * sx, rtol=rtol,
                               msg=lambda m: f"seed {seed}: forward differs\n{m}")
    # the positive latents: same index sets (sparsify's order is unspecified)
    for r in range(0, x_ours.shape[0], 7):
        if same[r]:
            a = set(enc.top_indices[r][enc.top_acts[r] > 0].tolist())
            b = set(idx[r][vals[r] > 0].tolist())
            assert a == b, f"seed {seed}: row {r} indices {sorted(a)} vs ours {sorted(b)}"
    assert (z > 0).any(-1).float().mean() > 0.5, f"seed {seed}: the test SAE barely fires"


@pytest.mark.parametrize("mode", ["none", "scalar"])
def test_sparsify_loads_our_topk(tmp_path, mode, caplog):
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 24, 96, 6
    sae = _topk_sae(d, n, k, mode, seed)
    x = _raw_acts(g, 256, d)
    scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if mode == "scalar" else None
    out = export_sae(sae, tmp_path / "sae", hook_name="blocks.2.hook_resid_post", model_name="tiny",
                     normalize=mode, scale=scale)
    sp_dir = export_sparsify(out, tmp_path / "sparsify")
    assert sorted(p.name for p in sp_dir.iterdir()) == ["cfg.json", "sae.safetensors", "sae_dist.json"]
    cfg = json.loads((sp_dir / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (d, n, k, "topk")
    assert json.loads((sp_dir / "sae_dist.json").read_text())["hook_name"] == "blocks.2.hook_resid_post"
    caplog.clear()
    with caplog.at_level("WARNING"):
        sc = SparseCoder.load_from_disk(sp_dir)
    said = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert not said, f"sparsify warned while loading our cfg.json: {said}"
    assert sc.num_latents == n and sc.cfg.k == k and sc.d_in == d
    assert sc.encoder.weight.shape == (n, d) and sc.W_dec.shape == (n, d)
    _compare(sc, load_sae(out), x, x, seed, rtol=1e-5)


def test_sparsify_from_loaded_module_with_b_dec_folded(tmp_path):
    """An SAE with apply_b_dec_to_input false (SAELens option; pre = x W_enc + b_enc) exported from the
    loaded module: b_dec W_enc folded into sparsify's encoder bias."""
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 16, 64, 4
    out = export_sae(_topk_sae(d, n, k, "none", seed), tmp_path / "sae", hook_name=None, model_name=None,
                     normalize="none")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = False
    (out / "cfg.json").write_text(json.dumps(cfg))
    ours = load_sae(out)
    sp_dir = export_sparsify(ours, tmp_path / "sparsify")
    assert json.loads((sp_dir / "sae_dist.json").read_text())["b_dec_folded_into_encoder_bias"]
    x = _raw_acts(g, 256, d)
    # independent check of our model's rule: pre = x W_enc + b_enc (no b_dec), TopK, ReLU
    with torch.no_grad():
        pre_ref = x.double() @ ours.W_enc.double() + ours.b_enc.double()
        top = pre_ref.topk(k, dim=-1)
        z_ref = torch.zeros_like(pre_ref).scatter_(-1, top.indices, top.values.relu())
        torch.testing.assert_close(ours.encode(x).double(), z_ref, atol=1e-5 * float(z_ref.abs().max()), rtol=1e-5)
    _compare(SparseCoder.load_from_disk(sp_dir), ours, x, x, seed, rtol=1e-4, allow_flips=2)


def test_sparsify_layer_norm_needs_opt_in(tmp_path):
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 16, 64, 4
    out = export_sae(_topk_sae(d, n, k, "layer_norm", seed), tmp_path / "sae", hook_name=None,
                     model_name=None, normalize="layer_norm")
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'.*allow_normalized_inputs"):
        export_sparsify(out, tmp_path / "sp")
    with pytest.warns(UserWarning, match="normalised inputs"):
        sp_dir = export_sparsify(out, tmp_path / "sp", allow_normalized_inputs=True)
    assert "std(x, unbiased)" in json.loads((sp_dir / "sae_dist.json").read_text())["input_normalization"]
    x = _raw_acts(g, 256, d)
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)  # the documented rule: (x - mean) / std (unbiased)
    _compare(SparseCoder.load_from_disk(sp_dir), load_sae(out), (x - mu) / std, x, seed, rtol=1e-4,
             allow_flips=2, y_map=lambda y: y * std + mu)


def test_sparsify_refuses_other_architectures(tmp_path):
    for arch in ("jumprelu", "relu"):
        sae = build_sae(SAEConfig(d_in=8, d_sae=16, k=None, architecture=arch, normalize="none"))
        out = export_sae(sae, tmp_path / arch, hook_name=None, model_name=None, normalize="none")
        want = {"jumprelu": "jumprelu", "relu": "standard"}[arch]
        with pytest.raises(ValueError, match=f"architecture '{want}' is not supported"):
            export_sparsify(out, tmp_path / f"{arch}_sp")
    with pytest.raises(TypeError, match="export_sae first"):
        export_sparsify(_topk_sae(8, 16, 2, "none", 0), tmp_path / "mod_sp")
