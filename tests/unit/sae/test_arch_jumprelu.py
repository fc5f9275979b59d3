"""JumpReLU SAE (`sae=jumprelu`, Rajamanoharan et al. 2024, arXiv:2407.14435): the straight-through
Functions against the paper's closed forms written out here, the whole loss gradient against an
independent detach-trick reference, the data-derived initial threshold, ground-truth recovery and L0
control through the real trainer, the JumpReLU export (threshold folding) for every normalisation, exact
resume, and the Hydra CLI. Fresh random inputs every run (the seed is in the assert messages)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.sae import sae_train_on_synthetic, train_interrupted_and_resumed
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic
from safetensors.torch import load_file

import sae_dist
from sae_dist.eval.synthetic import SyntheticDictionary, mean_max_cosine
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.jumprelu import JumpReLUSAE, jumprelu, l0_coef_at, step
from sae_dist.store import denormalize, normalize, write_store

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _window_inputs(g, B, n, theta, eps):
    """pre [B, n] with about a third of the entries inside theta's kernel window (|pre - theta| <
    0.45 eps), the rest well outside it (|pre - theta| > 0.55 eps), so no entry sits on the edge."""
    inside = theta + eps * (0.9 * torch.rand(B, n, generator=g) - 0.45)
    sign = torch.where(torch.rand(B, n, generator=g) < 0.5, -1.0, 1.0)
    outside = theta + sign * eps * (0.55 + 3 * torch.rand(B, n, generator=g))
    far = 2 * torch.randn(B, n, generator=g)
    far = torch.where((far - theta).abs() > 0.55 * eps, far, outside)
    pick = torch.rand(B, n, generator=g)
    return torch.where(pick < 0.35, inside, torch.where(pick < 0.7, outside, far))


def test_straight_through_functions_match_the_papers_closed_forms():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    B, n = 37, 23
    eps = float(10 ** (-3 + 2 * torch.rand((), generator=g)))  # 1e-3 .. 1e-1
    theta = (0.05 + torch.rand(n, generator=g)).requires_grad_(True)
    pre = _window_inputs(g, B, n, theta.detach(), eps).requires_grad_(True)
    up = torch.randn(B, n, generator=g)
    msg = f"seed {seed}"
    P, TH = pre.detach(), theta.detach()

    # paper eq. 11 and the ordinary derivative in pre, written out per latent with a loop over tokens
    z = jumprelu(pre, theta, eps)
    on = pre.detach() > theta.detach()
    assert torch.equal(z.detach(), torch.where(on, pre.detach(), torch.zeros(()))), msg
    assert 0 < int(on.sum()) < B * n, msg
    gp, gt = torch.autograd.grad(z, (pre, theta), up)
    assert torch.equal(gp, up * on), msg
    ref = torch.zeros(n, dtype=torch.float64)
    n_in = 0
    for i in range(n):
        for b in range(B):
            if abs(float(P[b, i]) - float(TH[i])) < eps / 2:  # K((pre - theta) / eps) = 1
                ref[i] += -(float(TH[i]) / eps) * float(up[b, i])
                n_in += 1
    assert n_in > B * n // 5, msg
    torch.testing.assert_close(gt.double(), ref, rtol=1e-5, atol=1e-4, msg=msg)

    # paper eq. 12: the Heaviside step, zero gradient to pre
    h = step(pre, theta, eps)
    assert torch.equal(h.detach(), on.float()), msg
    gp, gt = torch.autograd.grad(h, (pre, theta), up)
    assert torch.equal(gp, torch.zeros_like(gp)), msg
    ref = torch.tensor([sum(-(1.0 / eps) * float(up[b, i]) for b in range(B)
                            if abs(float(P[b, i]) - float(TH[i])) < eps / 2) for i in range(n)],
                       dtype=torch.float64)
    torch.testing.assert_close(gt.double(), ref, rtol=1e-5, atol=1e-3, msg=msg)


def _random_sae(seed: int, d: int = 12, n: int = 40, **options) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig(d_in=d, d_sae=n, k=None, architecture="jumprelu", options=options),
                      generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(d, generator=g))
        sae.W_enc.add_(0.2 * torch.randn(d, n, generator=g))
        sae.log_threshold.add_(0.5 * torch.randn(n, generator=g))
    return sae


@pytest.mark.parametrize("target", [None, 5.0])
def test_loss_and_gradients_match_a_detach_trick_reference(target):
    """Every parameter's gradient against the same estimator built without custom Functions:
    value * H.detach() plus (theta - theta.detach()) * pseudo-derivative.detach()."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    eps = 0.3  # wide window: many entries inside it
    coef = float(0.01 + 0.1 * torch.rand((), generator=g))
    sae = _random_sae(seed, l0_coef=coef, l0_warmup_frac=0.5, bandwidth=eps, init_threshold=0.4,
                      target_l0=target)
    x = torch.randn(50, sae.d_in, generator=g)
    sae.set_progress(3, 20)  # warm-up: lambda = coef * 3 / 10
    res = sae.training_step_losses(x, None)
    res.loss.backward()

    P = {k: p.detach().clone().requires_grad_(True) for k, p in sae.named_parameters()}
    theta = P["log_threshold"].exp()
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    H = (pre > theta).float().detach()
    K = ((pre - theta).abs() < eps / 2).float().detach()
    dz_dtheta = (-(theta / eps) * K).detach()
    dh_dtheta = (-(1.0 / eps) * K).detach()
    z = pre * H + (theta - theta.detach()) * dz_dtheta
    h = H + (theta - theta.detach()) * dh_dtheta
    x_hat = z @ P["W_dec"] + P["b_dec"]
    nmse = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    l0 = h.sum(1).mean()
    s = l0 if target is None else (l0 / target - 1) ** 2
    lam = coef * 3 / 10
    loss = nmse + lam * s
    loss.backward()
    msg = f"seed {seed}"
    torch.testing.assert_close(res.loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.terms["l0_penalty"], s.detach(), rtol=1e-6, atol=1e-6, msg=msg)
    assert math.isclose(float(res.terms["l0_coef"]), lam, rel_tol=1e-6), msg
    torch.testing.assert_close(res.terms["mean_threshold"], theta.mean().detach(), msg=msg)
    torch.testing.assert_close(res.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5, msg=msg)
    assert float(res.l0_sum) == float(H.sum()), msg
    assert torch.equal(res.fired, H.bool().any(0)), msg
    assert float(K.sum()) > 50, msg
    for name, p in sae.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, (name, msg)
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-4, atol=1e-6, msg=f"{name} {msg}")


def test_auto_initial_threshold():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    coef = float(0.01 + 0.1 * torch.rand((), generator=g))
    sae = _random_sae(seed, l0_coef=coef)
    with torch.no_grad():
        sae.log_threshold.zero_()
    torch.testing.assert_close(sae.threshold, torch.full((sae.d_sae,), 0.001))  # Gemma Scope's until data
    x = 3 * torch.randn(64, sae.d_in, generator=g) + 1
    sae.set_progress(0, 10)
    sae.training_step_losses(x, None)
    D = sum(float(((x[b] - x.mean(0)) ** 2).sum()) for b in range(64)) / 64
    torch.testing.assert_close(sae.threshold.detach(), torch.full((sae.d_sae,), math.sqrt(coef * D)),
                               msg=f"seed {seed}")
    assert bool(sae.threshold_initialized) and float(sae.log_threshold.detach().abs().max()) == 0.0
    before = sae.threshold.detach().clone()
    sae.training_step_losses(2 * x, None)  # once only
    assert torch.equal(sae.threshold.detach(), before)

    # with a target: this batch's L0 equals the target
    T = float(1 + 6 * torch.rand((), generator=g))
    sae = _random_sae(seed, target_l0=T, l0_coef=1.0)
    x = torch.randn(200, sae.d_in, generator=g)
    sae.training_step_losses(x, None)
    with torch.no_grad():
        l0 = float((sae.encode(x) != 0).sum(1).float().mean())
    assert abs(l0 - round(200 * T) / 200) < 1e-6, (l0, T, seed)
    # a numeric init_threshold is the papers' recipe: used as is, log_threshold = log(theta)
    sae = _random_sae(seed, init_threshold=0.25)
    sae.training_step_losses(x, None)
    assert float(sae.log_threshold_offset) == 0.0 and bool(sae.threshold_initialized)


def test_options_and_schedule():
    base = dict(d_in=8, d_sae=16, k=None, architecture="jumprelu")
    for opt, bad, rng in [("l0_coef", -1.0, r">= 0"), ("bandwidth", 0.0, r"> 0"), ("target_l0", -2, r"> 0"),
                          ("l0_warmup_frac", 1.5, r"\[0.0, 1.0\]"), ("init_threshold", "big", r"auto"),
                          ("init_threshold", 0, r"> 0")]:
        with pytest.raises(ValueError, match=rf"{opt}={bad!r}.*{rng}"):
            JumpReLUSAE(SAEConfig(**base, options={opt: bad}))
    with pytest.raises(ValueError, match=r"unknown option.*'k_active'"):
        JumpReLUSAE(SAEConfig(**base, options={"k_active": 3}))
    assert JumpReLUSAE.shardable is False and not JumpReLUSAE.uses_k
    assert l0_coef_at(0.2, 0.1, 0, 100) == 0.0 and l0_coef_at(0.2, 0.1, 5, 100) == pytest.approx(0.1)
    assert l0_coef_at(0.2, 0.1, 50, 100) == 0.2 and l0_coef_at(0.2, 0.0, 0, 100) == 0.2


@pytest.mark.parametrize("mode", ["none", "scalar", "layer_norm"])
def test_export_reproduces_the_training_module(tmp_path, mode):
    seed = torch_seed()
    sae = _random_sae(seed, d=16, n=48, init_threshold=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    s = float(0.5 + 3 * torch.rand((), generator=g))
    export_sae(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", model_name="m", normalize=mode,
               scale=s if mode == "scalar" else None)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 48 and "k" not in cfg
    loaded = sae_dist.load_sae(tmp_path / "sae")
    x = 2 * torch.randn(300, 16, generator=g) + 0.5  # raw activations
    with torch.no_grad():
        if mode == "none":
            f = 1.0
            x_n, ctx = x, {}
        elif mode == "scalar":
            f = s
            x_n, ctx = normalize(x, "scalar", s)
        else:
            f = math.sqrt(16 / 15)
            x_n, ctx = normalize(x, "layer_norm")
        torch.testing.assert_close(loaded.threshold.detach(), sae.threshold.detach() / f)
        pre = sae.pre_acts(x_n)
        z = sae.encode(x_n)
        # the threshold matters: some pre-activations are positive but below theta
        assert int(((pre > 0) & (z == 0)).sum()) > 0 and int((z > 0).sum()) > 0, seed
        torch.testing.assert_close(loaded.encode(x), z / f, rtol=1e-5, atol=1e-5, msg=str(seed))
        ref = denormalize(sae(x_n), mode, ctx)
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-4, msg=str(seed))


def test_recovers_the_dictionary(tmp_path):
    seed = torch_seed()
    cfg = SAEConfig(d_in=32, d_sae=128, k=None, normalize="none", architecture="jumprelu",
                    options={"l0_coef": 0.05})
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, tokens=450_000, batch_tokens=1024, seed=seed, lr=0.006)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))  # a random decoder: the metric can fail
    after = mean_max_cosine(sd.features, loaded.W_dec)
    l0 = res["metrics"]["train/l0"]
    print(f"jumprelu l0_coef 0.05: MMCS {after:.3f} (random {before:.3f}), L0 {l0:.2f} (data 3.2)")
    assert before < 0.7, before
    assert after >= 0.9, (after, seed)
    assert 2.0 <= l0 <= 5.0, (l0, seed)


def test_l0_lands_at_the_target(tmp_path):
    seed = torch_seed()
    T = 4.0
    cfg = SAEConfig(d_in=32, d_sae=128, k=None, normalize="none", architecture="jumprelu",
                    options={"l0_coef": 1.0, "target_l0": T, "bandwidth": 0.02})
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, tokens=300_000, batch_tokens=1024, seed=seed, lr=0.006)
    x, _ = sd.sample(8192)
    with torch.no_grad():
        l0_fresh = float((loaded.encode(x) > 0).sum(1).float().mean())
    l0 = res["metrics"]["train/l0"]
    mmcs = mean_max_cosine(sd.features, loaded.W_dec)
    print(f"jumprelu target_l0 {T}: train L0 {l0:.2f}, fresh-sample L0 {l0_fresh:.2f}, MMCS {mmcs:.3f}")
    assert abs(l0 - T) <= 0.25 * T, (l0, seed)
    assert abs(l0_fresh - T) <= 0.25 * T, (l0_fresh, seed)


def test_larger_l0_coef_gives_lower_l0(tmp_path):
    """Same numeric init (no data-derived threshold): only the straight-through threshold
    gradients of the L0 term separate the two runs."""
    seed = torch_seed()
    out = {}
    for coef in (0.01, 0.1):
        cfg = SAEConfig(d_in=32, d_sae=128, k=None, normalize="none", architecture="jumprelu",
                        options={"l0_coef": coef, "init_threshold": 0.3, "bandwidth": 0.02})
        sd = SyntheticDictionary(32, 64, p_active=0.05, seed=seed)
        _, res, loaded = train_on_synthetic(tmp_path / str(coef), cfg, dictionary=sd, tokens=153_600,
                                            batch_tokens=1024, seed=seed, lr=0.006)
        out[coef] = (res["metrics"]["train/l0"], float(loaded.threshold.detach().mean()))
    print(f"jumprelu L0 / mean threshold by l0_coef: {out}")
    (l0_lo, th_lo), (l0_hi, th_hi) = out[0.01], out[0.1]
    assert l0_hi < 0.7 * l0_lo, (out, seed)
    assert th_hi > 0.3 * 1.2 and th_hi > th_lo, (out, seed)  # the L0 term raised the thresholds


def test_resume_is_exact(tmp_path):
    seed = torch_seed()
    sd = SyntheticDictionary(16, 48, p_active=0.06, seed=seed)
    x, _ = sd.sample(4096)
    store = write_store(tmp_path / "s.zarr", x, attrs={"hook_name": "synthetic", "model": "synthetic"})
    cfg = SAEConfig(d_in=16, d_sae=64, k=None, normalize="none", architecture="jumprelu",
                    options={"l0_coef": 1.0, "target_l0": 3, "bandwidth": 0.02, "l0_warmup_frac": 0.2})
    wa, wb = train_interrupted_and_resumed(tmp_path, store, cfg, seed)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(wa[name], wb[name]), (name, seed)
    assert float(wa["threshold"].min()) > 0, seed
    la = [json.loads(s) for s in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    keys = ("train/loss", "train/l0", "train/mean_threshold", "train/l0_penalty")
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb], seed
    assert len({r["train/mean_threshold"] for r in la}) > 5, seed  # the thresholds do train


def test_sae_train_cli_jumprelu(tmp_path, console_script):
    seed = torch_seed()
    _, x, proc, run = sae_train_on_synthetic(  # sae-train, in this process (conftest.py)
        console_script, tmp_path, seed, "sae=jumprelu", "sae.d_sae=64", "sae.target_l0=4", "sae.bandwidth=0.01",
        threads=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 64 and cfg["d_in"] == 24, cfg
    w = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert w["threshold"].shape == (64,) and float(w["threshold"].min()) > 0
    state = json.loads((run / "sae" / "training_state.json").read_text())
    assert state["sae_cfg"]["options"]["target_l0"] == 4 and state["sae_cfg"]["k"] is None
    sae = sae_dist.load_sae(run / "sae")
    with torch.no_grad():
        assert sae(x[:256]).shape == (256, 24)
