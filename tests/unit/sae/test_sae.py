"""TopK SAE module, AuxK, init and config checks against independent re-implementations."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from sae_dist.kernels.sparse_decode import auxk_loss_reference
from sae_dist.sae import (
    DeadLatentTracker,
    SAEConfig,
    TopKSAE,
    default_k_aux,
    geometric_median,
    init_b_dec_,
)
from sae_dist.sae.base import dead_topk


def auxk_loss(pre, dead, residual, W_dec, k_aux):
    """The dense AuxK loss every non-kernel architecture uses: `dead_topk` then the plain torch loss."""
    return auxk_loss_reference(*dead_topk(pre, dead, k_aux), W_dec, residual)


def _sae(d=24, n=96, k=5, seed=None, **kw):
    cfg = SAEConfig(d_in=d, d_sae=n, k=k, **kw)
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    sae = TopKSAE(cfg, generator=g)
    with torch.no_grad():  # non-trivial biases
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


def _naive_encode(sae, x):
    """Dense reference: pre = (x - b_dec) W_enc + b_enc; keep top-k per row, relu, zeros elsewhere."""
    W_enc, b_enc, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x.double() - b_dec) @ W_enc + b_enc
    z = torch.zeros_like(pre)
    for b in range(pre.shape[0]):
        order = np.argsort(-pre[b].numpy(), kind="stable")[: sae.k]
        for j in order:
            z[b, j] = max(pre[b, j].item(), 0.0)
    return z


def test_topk_forward_matches_naive_dense():
    sae = _sae()
    x = torch.randn(40, 24)
    z_ref = _naive_encode(sae, x)
    z = sae.encode(x)
    assert z.shape == (40, 96)
    torch.testing.assert_close(z.double(), z_ref, atol=1e-5, rtol=1e-5)
    assert ((z > 0).sum(-1) <= sae.k).all()
    vals, idx = sae.encode_sparse(x)
    assert vals.shape == (40, 5) and idx.dtype == torch.int64
    x_ref = z_ref @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    torch.testing.assert_close(sae(x).double(), x_ref, atol=1e-5, rtol=1e-5)


def test_relu_zeroes_negative_topk_values():
    sae = _sae(k=8)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative
    vals, idx = sae.encode_sparse(torch.randn(7, 24))
    assert (vals == 0).all()
    torch.testing.assert_close(sae(torch.randn(7, 24)), sae.b_dec.detach().expand(7, -1))


def test_decode_sparse_equals_dense_decode_and_grads():
    sae = _sae()
    vals = torch.rand(13, 5, requires_grad=True)
    idx = torch.stack([torch.randperm(96)[:5] for _ in range(13)])
    z = torch.zeros(13, 96).scatter(-1, idx, vals.detach())
    dense = sae.decode(z)
    sparse = sae.decode_sparse(vals, idx)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    # gradients: values get <W_dec[i], g>, W_dec rows get v * g
    g = torch.randn(13, 24)
    (sparse * g).sum().backward()
    torch.testing.assert_close(vals.grad, (sae.W_dec.detach()[idx] * g[:, None, :]).sum(-1))
    ref = torch.zeros(96, 24).index_add_(0, idx.reshape(-1), (vals.detach()[..., None] * g[:, None, :]).reshape(-1, 24))
    torch.testing.assert_close(sae.W_dec.grad, ref, atol=1e-5, rtol=1e-5)


def test_tied_init_unit_rows_and_transpose():
    sae = _sae(d=32, n=200, k=4, b_dec_init="zeros")
    norms = sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(200))
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().T)
    # directions are spread out (not all the same): mean |cos| of random unit vectors in 32-d ~ 0.14
    cos = sae.W_dec.detach() @ sae.W_dec.detach().T
    off = cos[~torch.eye(200, dtype=torch.bool)].abs().mean()
    assert 0.05 < off < 0.3
    scaled = TopKSAE(SAEConfig(d_in=32, d_sae=200, k=4, enc_init_scale=0.5),
                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled.W_enc.detach(), 0.5 * scaled.W_dec.detach().T)


def test_unit_norm_after_step_and_parallel_grad_removed():
    sae = _sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 24)
    out = sae.training_step_losses(x, torch.rand(96) < 0.3)
    out.loss.backward()
    raw = sae.W_dec.grad.clone()
    sae.remove_parallel_grads_()
    g = sae.W_dec.grad
    w = sae.W_dec.detach()
    # independent check: projected grad is orthogonal to each row and equals raw - (raw.w) w
    dots = (g * w).sum(-1)
    assert dots.abs().max() < 1e-6 * (1 + raw.abs().max())
    expected = raw.numpy() - np.einsum("ij,ij->i", raw.numpy(), w.numpy())[:, None] * w.numpy()
    np.testing.assert_allclose(g.numpy(), expected, atol=1e-6)
    assert raw.norm() > 0
    opt.step()
    assert not torch.allclose(sae.W_dec.detach().norm(dim=-1), torch.ones(96), atol=1e-6)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.ones(96))


def test_geometric_median_matches_scipy():
    rng = np.random.default_rng(np.random.randint(2**31))
    pts = rng.standard_normal((60, 5)) * rng.uniform(0.5, 3, size=5) + rng.standard_normal(5)
    pts[:6] += 20.0  # outliers pull the mean, not the median
    m = geometric_median(torch.from_numpy(pts).float(), n_iter=500).double().numpy()

    def f(c):
        return np.linalg.norm(pts - c, axis=1).sum()

    ref = minimize(f, pts.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 40000, "maxfev": 40000}).x
    assert f(m) <= f(ref) + 1e-4
    np.testing.assert_allclose(m, ref, atol=1e-3)
    assert np.linalg.norm(m - ref) < 0.2 * np.linalg.norm(pts.mean(0) - ref)


def test_init_b_dec_modes():
    sae = _sae(d=8, n=32, k=2)
    sample = torch.randn(100, 8) + 3.0
    init_b_dec_(sae, sample, "mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0), atol=1e-6, rtol=1e-6)
    init_b_dec_(sae, sample, "zeros")
    assert (sae.b_dec == 0).all()
    with pytest.raises(ValueError, match="d_in=8"):
        init_b_dec_(sae, torch.randn(10, 9), "geometric_median")


def _independent_auxk(pre, dead, e, W_dec, k_aux):
    """numpy re-implementation of the AuxK loss."""
    pre, e, W = pre.double().numpy(), e.double().numpy(), W_dec.double().numpy()
    dead_idx = np.nonzero(dead.numpy())[0]
    if len(dead_idx) == 0:
        return 0.0
    kk = min(k_aux, len(dead_idx))
    e_hat = np.zeros_like(e)
    for b in range(pre.shape[0]):
        vals = pre[b, dead_idx]
        top = dead_idx[np.argsort(-vals)[:kk]]
        e_hat[b] = np.maximum(pre[b, top], 0) @ W[top]
    num = ((e - e_hat) ** 2).sum()
    den = ((e - e.mean(0)) ** 2).sum()
    return num / den


def test_auxk_loss_vs_independent():
    n, d = 64, 16
    pre = torch.randn(32, n)
    W = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    e = torch.randn(32, d)
    for n_dead, k_aux in [(20, 8), (5, 8), (0, 8)]:
        dead = torch.zeros(n, dtype=torch.bool)
        dead[torch.randperm(n)[:n_dead]] = True
        got = float(auxk_loss(pre, dead, e, W, k_aux))
        assert got == pytest.approx(_independent_auxk(pre, dead, e, W, k_aux), rel=1e-5, abs=1e-7)
    # NaN -> 0: zero-variance residual gives 0/0
    dead = torch.ones(n, dtype=torch.bool)
    assert float(auxk_loss(pre, dead, torch.zeros(32, d), W, 4)) == 0.0
    with pytest.raises(ValueError, match="dead_mask"):
        auxk_loss(pre, torch.ones(n), e, W, 4)


def test_training_losses_auxk_and_multitopk_formula():
    sae = _sae(d=16, n=64, k=3, multi_topk=True, multi_topk_factor=4, multi_topk_weight=0.125)
    x = torch.randn(50, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_step_losses(x, dead)

    def nmse(xh):
        xd = x.double()
        return float(((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())

    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    pre = ((x.double() - b_dec) @ sae.W_enc.detach().double() + sae.b_enc.detach().double())
    z_k = _naive_encode(sae, x)
    sae.cfg.k = 12
    z_4k = _naive_encode(sae, x)
    sae.cfg.k = 3
    l_k, l_4k = nmse(z_k @ W_dec + b_dec), nmse(z_4k @ W_dec + b_dec)
    e = x.double() - (z_k @ W_dec + b_dec)
    aux = _independent_auxk(pre, dead, e, W_dec, sae.cfg.k_aux)
    assert float(out.fvu) == pytest.approx(l_k, rel=1e-5)
    assert float(out.multi_topk_fvu) == pytest.approx(l_4k, rel=1e-5)
    assert float(out.auxk_loss) == pytest.approx(aux, rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(l_k + l_4k / 8 + aux / 32, rel=1e-5)
    # aux gradient does not flow into the main reconstruction (residual detached): with every
    # latent alive the loss has no aux term and equals the Multi-TopK formula
    out2 = sae.training_step_losses(x, torch.zeros(64, dtype=torch.bool))
    assert float(out2.auxk_loss) == 0.0
    assert float(out2.loss.detach()) == pytest.approx(l_k + l_4k / 8, rel=1e-5)


def test_dead_latent_tracker():
    tr = DeadLatentTracker(6, dead_tokens=10)
    tr.update(torch.tensor([[1.0, 0.0], [2.0, 1.0]]), torch.tensor([[0, 1], [2, 0]]))  # latent 1 value 0
    assert tr.tokens_since_fired.tolist() == [0, 2, 0, 2, 2, 2]
    for _ in range(4):
        tr.update(torch.tensor([[1.0], [1.0]]), torch.tensor([[0], [0]]))
    assert tr.tokens_since_fired.tolist() == [0, 10, 8, 10, 10, 10]
    assert tr.dead_mask().tolist() == [False, True, False, True, True, True]
    assert tr.ever_fired.tolist() == [True, False, True, False, False, False]


def test_config_validation_and_k_aux_default():
    assert default_k_aux(768) == 512 and default_k_aux(576) == 256
    assert SAEConfig(d_in=768, d_sae=4096, k=32).k_aux == 512
    assert SAEConfig(d_in=768, d_sae=100, k=32).k_aux == 100
    with pytest.raises(ValueError, match="k=65 > d_sae=64"):
        SAEConfig(d_in=8, d_sae=64, k=65)
    with pytest.raises(ValueError, match="multi_topk_factor"):
        SAEConfig(d_in=8, d_sae=64, k=20, multi_topk=True)
    with pytest.raises(ValueError, match="normalize"):
        SAEConfig(d_in=8, d_sae=64, k=2, normalize="bogus")
    with pytest.raises(ValueError, match="d_in 8"):
        TopKSAE(SAEConfig(d_in=8, d_sae=16, k=2)).encode(torch.randn(3, 9))
    assert math.isclose(SAEConfig(d_in=8, d_sae=16, k=2).auxk_coef, 1 / 32)


def test_auxk_zero_variance_residual_gives_zero_loss_and_finite_grads():
    """A constant residual has zero variance: the paper's NaN -> 0 rule must not poison the gradients."""

    n, d, B = 40, 8, 6
    pre = torch.randn(B, n, requires_grad=True)
    W_dec = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_(True)
    # every token the same small integers: the batch mean is exact, so the variance is exactly 0
    residual = torch.randint(-3, 4, (1, d)).float().expand(B, d).contiguous()
    dead = torch.rand(n) < 0.5
    dead[0] = True
    loss = auxk_loss(pre, dead, residual, W_dec, k_aux=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pre.grad).all() and torch.isfinite(W_dec.grad).all()
