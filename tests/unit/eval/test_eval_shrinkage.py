"""Shrinkage (sae_dist.eval.shrinkage; Gao et al. 2024 sec. 5.1): an encoder that outputs the exact
least-squares code on its support has ratio 1; the same codes halved have ratio 2; the refinement
agrees with scipy.optimize.nnls; sae_shrinkage on an exported SAE agrees with a direct computation.
Chunking: results in chunks of tokens that do not divide N equal an unchunked float64 reference (scipy
NNLS per token) and the one-chunk result up to reassociation; with CHUNK_BYTES patched small the
largest float64 tensor (a TorchDispatchMode sees every op's output) and a dense SAE's largest
[*, d_sae] code stay within it, where the unchunked formulas build [N, k, d_in] / [N, d_sae] tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.seeds import torch_seed
from torch.utils._python_dispatch import TorchDispatchMode

from sae_dist.eval.shrinkage import refine_all, refine_support, sae_shrinkage, shrinkage


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


# --- chunking (sae_dist.eval.shrinkage.CHUNK_BYTES / chunk=): same results, bounded float64 tensors ---

class _LargestOutputs(TorchDispatchMode):
    """The largest output bytes of every torch op by dtype, and of outputs whose last dim is `width`."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.by_dtype, self.of_width = width, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not func.is_view:
                nbytes = t.numel() * t.element_size()
                self.by_dtype[t.dtype] = max(self.by_dtype.get(t.dtype, 0), nbytes)
                if t.ndim >= 1 and t.shape[-1] == self.width:
                    self.of_width = max(self.of_width, nbytes)
        return out


def _codes(seed, n_tok, d, n, k):
    """Codes on a random support (some entries 0, token 0 all zero), inputs noisy enough that some
    least-squares codes on the support are negative (the FISTA path)."""
    x, idx, W, b = _problem(seed, n_tok=n_tok, d=d, n=n, k=k)
    g = torch.Generator().manual_seed(seed + 1)
    x = x + 2.0 * torch.randn(x.shape, generator=g)
    values = torch.rand(idx.shape, generator=g) + 0.1
    values[torch.rand(idx.shape, generator=g) < 0.2] = 0
    values[0] = 0
    return x, values, idx, W, b


def _reference(x, values, idx, W, b, support):
    """Unchunked float64 metrics with scipy's NNLS per token (module docstring's definitions)."""
    from scipy.optimize import nnls

    keep = (values != 0).any(1)
    x, values, idx = x[keep].double(), values[keep].double(), idx[keep]
    t, W = x - b.double(), W.double()
    enc = torch.einsum("nk,nkd->nd", values, W[idx])
    ref, ratios = torch.zeros_like(t), []
    for i in range(t.shape[0]):
        rows = W[idx[i][values[i] != 0]] if support == "active" else W
        z, _ = nnls(rows.T.numpy(), t[i].numpy())
        ref[i] = torch.from_numpy(z) @ rows
        ratios.append(np.linalg.norm(z) / float(values[i].norm()))
    total = float((t - t.mean(0)).square().sum())
    fvu_enc, fvu_ref = float((t - enc).square().sum()) / total, float((t - ref).square().sum()) / total
    return {"shrinkage_tokens": int(keep.sum()), "shrinkage_ratio": float(np.mean(ratios)),
            "shrinkage_fvu_encoder": fvu_enc, "shrinkage_fvu_refined": fvu_ref,
            "shrinkage_fvu_gain": (fvu_enc - fvu_ref) / fvu_enc}


@pytest.mark.parametrize("support", ["active", "all"])
def test_chunked_shrinkage_matches_unchunked_reference(support, monkeypatch):
    from sae_dist.eval import shrinkage as S

    seed = torch_seed(2**31)
    # d_sae < d_in: the NNLS over all latents has one minimiser, so FISTA's result is scipy's
    x, values, idx, W, b = _codes(seed, n_tok=24, d=24, n=16, k=5)
    want = _reference(x, values, idx, W, b, support)
    whole = shrinkage(x, values, idx, W, b, support=support, chunk=1000)
    # 23 tokens used: chunks of 5 and 7 leave a short last chunk; CHUNK_BYTES sized for 3 tokens' gathered
    # rows [k, d] per chunk (and for "all" float64 blocks of 15 rows of W_dec: 15 + 1 of the 16 latents)
    got = [shrinkage(x, values, idx, W, b, support=support, chunk=c) for c in (5, 7)]
    monkeypatch.setattr(S, "CHUNK_BYTES", 3 * 8 * 5 * 24)
    got.append(shrinkage(x, values, idx, W, b, support=support))
    for res in [whole, *got]:
        assert res["shrinkage_tokens"] == want["shrinkage_tokens"] == 23
        for key in ("shrinkage_ratio", "shrinkage_fvu_encoder", "shrinkage_fvu_refined", "shrinkage_fvu_gain"):
            assert res[key] == pytest.approx(want[key], rel=1e-6), (seed, support, key)
            # chunking only reassociates sums: far tighter than the solver's tolerance
            assert res[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15), (seed, support, key)
    if support == "active":
        assert torch.equal(refine_support(x, values, idx, W, b, chunk=7) != 0,
                           refine_support(x, values, idx, W, b) != 0)
        assert torch.allclose(refine_support(x, values, idx, W, b, chunk=7), refine_support(x, values, idx, W, b),
                              rtol=1e-12, atol=1e-14)
    else:
        z0 = torch.zeros(x.shape[0], W.shape[0]).scatter_(1, idx, values)
        assert torch.allclose(refine_all(x, z0, W, b, chunk=7), refine_all(x, z0, W, b, chunk=1000),
                              rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="chunk must be a number of tokens >= 1.*got 0"):
        shrinkage(x, values, idx, W, b, support=support, chunk=0)


@pytest.mark.parametrize("support", ["active", "all"])
def test_shrinkage_float64_tensors_bounded_by_chunk_bytes(support, monkeypatch):
    from sae_dist.eval import shrinkage as S

    seed = torch_seed(2**31)
    n_tok, d, n, k = 30, 24, 96, 8
    x, values, idx, W, b = _codes(seed, n_tok=n_tok, d=d, n=n, k=k)
    whole = shrinkage(x, values, idx, W, b, support=support, max_iter=20)
    # one token's largest float64 tensor: its gathered rows [k, d] (and for "all" its codes [n], smaller)
    bound = 7 * 8 * k * d
    monkeypatch.setattr(S, "CHUNK_BYTES", bound)
    rec = _LargestOutputs(n)
    with rec:
        res = shrinkage(x, values, idx, W, b, support=support, max_iter=20)
    # unchunked, [N, k, d] float64 rows (and [N, d_sae] codes, a float64 W_dec) are far larger
    assert 0 < rec.by_dtype[torch.float64] <= bound < 8 * n_tok * k * d, (seed, rec.by_dtype)
    for key in ("shrinkage_ratio", "shrinkage_fvu_encoder", "shrinkage_fvu_refined"):
        assert res[key] == pytest.approx(whole[key], rel=1e-12), (seed, key)


def test_dense_sae_codes_encoded_in_chunks(monkeypatch):
    from scipy.optimize import nnls

    from sae_dist.eval import shrinkage as S
    from sae_dist.sae.export import ExportedSAE

    seed = torch_seed(2**31)
    g = torch.Generator().manual_seed(seed)
    d, n, n_tok = 16, 256, 100
    W_dec = torch.randn(n, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    tensors = {"W_enc": W_dec.T.clone(), "b_enc": torch.full((n,), -4.0), "W_dec": W_dec, "b_dec": torch.zeros(d)}
    sae = ExportedSAE({"architecture": "standard", "d_in": d, "d_sae": n}, tensors)
    x = 1.5 * torch.randn(n_tok, d, generator=g)
    bound = 7 * 4 * n  # float32 codes [7, d_sae]
    monkeypatch.setattr(S, "CHUNK_BYTES", bound)
    rec = _LargestOutputs(n)
    with rec:
        res = sae_shrinkage(sae, x)
    assert 0 < rec.of_width <= bound < 4 * n_tok * n, (seed, rec.of_width)  # unchunked: [N, d_sae]
    # reference: the ReLU codes by hand, NNLS on each token's non-zero set (fewer than d latents: one minimiser)
    z = torch.relu(x @ W_dec.T - 4.0)
    assert int((z != 0).sum(1).max()) < d, seed
    ratios = []
    for t in range(n_tok):
        s = z[t] > 0
        if bool(s.any()):
            sol, _ = nnls(W_dec[s].T.double().numpy(), x[t].double().numpy())
            ratios.append(np.linalg.norm(sol) / float(z[t][s].double().norm()))
    assert 10 < res["shrinkage_tokens"] == len(ratios) < n_tok, seed
    assert res["shrinkage_ratio"] == pytest.approx(np.mean(ratios), rel=1e-5), seed
    # no tokens: no codes to refine (the unchunked encoder took the max of an empty L0)
    none = sae_shrinkage(sae, x[:0])
    assert none["shrinkage_tokens"] == 0 and none["shrinkage_ratio"] is None
