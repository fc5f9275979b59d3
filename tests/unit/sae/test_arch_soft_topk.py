"""sae=soft_topk (`sae_dist.sae.soft_topk`): the LML soft top-k mask against independent references,
and the synthetic ground truth through the real trainer. Fresh random inputs every run."""

from __future__ import annotations

import pytest
import torch
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic

from sae_dist.eval.synthetic import mean_max_cosine
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.soft_topk import annealed_temperature, soft_topk_mask, soft_topk_threshold


def test_mask_sums_to_k_and_tends_to_hard_topk():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(16, 40, generator=g, dtype=torch.float64)
    k = 5
    m = soft_topk_mask(s, k, 0.3)
    torch.testing.assert_close(m.sum(-1), torch.full((16,), float(k), dtype=m.dtype), rtol=1e-4, atol=1e-4)
    hard = torch.zeros_like(s).scatter_(-1, s.topk(k, dim=-1).indices, 1.0)
    # cold limit: the temperature must be small against each row's gap between the k-th and (k+1)-th
    # scores (a near-tie is legitimately soft at any fixed temperature)
    top = s.topk(k + 1, dim=-1).values
    gap = float((top[:, k - 1] - top[:, k]).min())
    cold = soft_topk_mask(s, k, min(1e-4, gap / 30))
    assert (cold - hard).abs().max() < 1e-3, (seed, gap)


def test_threshold_matches_a_bisection_reference():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(8, 30, generator=g, dtype=torch.float64)
    k, T = 4, 0.2
    tau = soft_topk_threshold(s, k, T)
    lo, hi = s.min(-1).values - 50 * T, s.max(-1).values + 50 * T
    for _ in range(200):  # plain bisection on g(tau) = sum sigmoid((s - tau)/T) - k (decreasing)
        mid = (lo + hi) / 2
        gm = torch.sigmoid((s - mid[:, None]) / T).sum(-1) - k
        lo, hi = torch.where(gm > 0, mid, lo), torch.where(gm > 0, hi, mid)
    torch.testing.assert_close(tau.double().reshape(-1), ((lo + hi) / 2), rtol=1e-5, atol=1e-5)


def test_mask_gradient_is_the_implicit_function_formula():
    """d m_i / d s_j = m_i (1 - m_i) / T * (delta_ij - w_j), w_j = m_j (1 - m_j) / sum m (1 - m)."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, 12, generator=g, dtype=torch.float64, requires_grad=True)
    k, T = 3, 0.5
    m = soft_topk_mask(s, k, T)
    jac = torch.stack([torch.autograd.grad(m[0, i], s, retain_graph=True)[0][0] for i in range(12)])
    md = m.detach()[0]
    a = md * (1 - md)
    w = a / a.sum()
    ref = (a[:, None] / T) * (torch.eye(12, dtype=torch.float64) - w[None, :])
    torch.testing.assert_close(jac, ref, rtol=1e-4, atol=1e-6)
    assert (jac.abs() > 1e-6).sum() > 12  # gradient reaches latents outside the top k (unlike hard TopK)


def test_anneal_schedule():
    T0, T1 = 0.1, 0.01
    assert annealed_temperature(0, 11, T0, T1, "exponential") == pytest.approx(T0)
    assert annealed_temperature(10, 11, T0, T1, "exponential") == pytest.approx(T1)
    assert annealed_temperature(5, 11, T0, T1, "exponential") == pytest.approx((T0 * T1) ** 0.5)
    assert annealed_temperature(5, 11, T0, T1, "linear") == pytest.approx((T0 + T1) / 2)
    assert annealed_temperature(7, 11, T0, T1, "none") == pytest.approx(T0)


@pytest.mark.slow  # trains through the real trainer (or loads the embedded LM): over 10 s
@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_recovers_the_dictionary_with_hard_l0_k(tmp_path, mode):
    k = 4
    cfg = SAEConfig(d_in=32, d_sae=128, k=k, normalize="none", dead_tokens=16384,
                    architecture="soft_topk", options={"mode": mode})
    sd, res, sae = train_on_synthetic(tmp_path, cfg, tokens=300_000, batch_tokens=1024)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))
    after = mean_max_cosine(sd.features, sae.W_dec)
    assert before < 0.7 and after >= 0.9, (mode, before, after)
    x, _ = sd.sample(2000)
    with torch.no_grad():
        l0 = float((sae.encode(x) != 0).sum(-1).float().mean())
    assert 0.9 * k <= l0 <= k, (mode, l0)
    assert sae.cfg["architecture"] == "topk"
