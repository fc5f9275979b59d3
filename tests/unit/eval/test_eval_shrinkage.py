"""Shrinkage (sae_dist.eval.shrinkage; Gao et al. 2024 sec. 5.1): an encoder that outputs the exact
least-squares code on its support has ratio 1; the same codes halved have ratio 2; the refinement
agrees with scipy.optimize.nnls; sae_shrinkage on an exported SAE agrees with a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.seeds import torch_seed

from sae_dist.eval.shrinkage import refine_support, sae_shrinkage, shrinkage


def _problem(seed, n_tok=200, d=24, n=96, k=5, noise=0.02):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    b = torch.randn(d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_tok)])
    v = torch.rand(n_tok, k, generator=g) + 1.0
    x = torch.einsum("nk,nkd->nd", v, W[idx]) + b + noise * torch.randn(n_tok, d, generator=g)
    return x, idx, W, b


def test_exact_encoder_ratio_one_and_halved_ratio_two():
    seed = torch_seed(2**31)
    x, idx, W, b = _problem(seed)
    # reference least squares on each token's support (torch.linalg.lstsq, float64)
    ls = torch.linalg.lstsq(W[idx].transpose(1, 2).double(), (x - b).double().unsqueeze(-1)).solution.squeeze(-1)
    assert float(ls.min()) > 0, seed  # the construction keeps the LS codes positive
    exact = shrinkage(x, ls, idx, W, b)
    assert exact["shrinkage_ratio"] == pytest.approx(1.0, abs=1e-6), seed
    assert abs(exact["shrinkage_fvu_gain"]) < 1e-6
    half = shrinkage(x, 0.5 * ls, idx, W, b)
    assert half["shrinkage_ratio"] == pytest.approx(2.0, rel=1e-6), seed
    assert half["shrinkage_fvu_refined"] == pytest.approx(exact["shrinkage_fvu_encoder"], rel=1e-6)
    x_c = (x - b).double()
    err = (x_c - torch.einsum("nk,nkd->nd", 0.5 * ls, W[idx].double())).square().sum()
    fvu_half = float(err / (x_c - x_c.mean(0)).square().sum())
    assert half["shrinkage_fvu_encoder"] == pytest.approx(fvu_half, rel=1e-6)
    assert half["shrinkage_fvu_gain"] == pytest.approx(1 - exact["shrinkage_fvu_encoder"] / fvu_half, rel=1e-6)
    assert half["shrinkage_tokens"] == x.shape[0] and half["shrinkage_support"] == "active"
    # over all latents the refinement can only reconstruct better than on the support
    full = shrinkage(x[:40], 0.5 * ls[:40], idx[:40], W, b, support="all")
    act = shrinkage(x[:40], 0.5 * ls[:40], idx[:40], W, b)
    assert full["shrinkage_fvu_refined"] <= act["shrinkage_fvu_refined"] * (1 + 1e-6), seed


def test_refinement_matches_scipy_nnls():
    from scipy.optimize import nnls

    seed = torch_seed(2**31)
    x, idx, W, b = _problem(seed, n_tok=30, k=8)
    x = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))  # some LS codes < 0
    values = torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed + 2)) + 0.1
    values[:, -1] = 0  # not in the support: must stay 0
    ref = refine_support(x, values, idx, W, b)
    n_bound = 0
    for t in range(x.shape[0]):
        A = W[idx[t, :-1]].T.double().numpy()
        sol, _ = nnls(A, (x[t] - b).double().numpy())
        assert np.allclose(ref[t, :-1].numpy(), sol, atol=1e-6), (seed, t, ref[t], sol)
        n_bound += int((sol == 0).sum())
    assert torch.all(ref[:, -1] == 0)
    assert n_bound > 0, seed  # the constraint was active somewhere


def test_sae_shrinkage_on_exported_sae(tmp_path):
    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae, load_sae
    from sae_dist.sae.topk import TopKSAE

    seed = torch_seed(2**31)
    d, n, k = 16, 64, 4
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize="none"), generator=torch.Generator().manual_seed(seed))
    export_sae(sae, tmp_path, hook_name="blocks.0.hook_resid_post", model_name="m", normalize="none")
    exp = load_sae(tmp_path)
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(seed + 1)) * 3
    res = sae_shrinkage(exp, x)
    # direct: encoder by hand, refined LS/NNLS on the support by scipy for each token
    from scipy.optimize import nnls

    with torch.no_grad():
        pre = (x - exp.b_dec) @ exp.W_enc + exp.b_enc
        v, i = pre.topk(k, dim=-1)
        v = torch.relu(v)
    ratios = []
    for t in range(x.shape[0]):
        s = v[t] > 0
        if not bool(s.any()):
            continue
        sol, _ = nnls(exp.W_dec.detach()[i[t][s]].T.double().numpy(), (x[t] - exp.b_dec.detach()).double().numpy())
        ratios.append(np.linalg.norm(sol) / float(v[t].double().norm()))
    assert res["shrinkage_tokens"] == len(ratios)
    assert res["shrinkage_ratio"] == pytest.approx(np.mean(ratios), rel=1e-5), seed
    with pytest.raises(ValueError, match="shrinkage_support must be 'active' or 'all', got 'some'"):
        sae_shrinkage(exp, x, support="some")
