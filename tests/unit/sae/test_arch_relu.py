"""`sae=relu` (ReLU + L1; Bricken et al. 2023, Cunningham et al. 2023, Conerly et al. 2024): ground-truth
recovery through the real trainer (uniform, and Zipf-frequency / log-normal-magnitude dictionaries at
the true L0), L1 -> sparsity, the loss against a numpy computation, the L1 warm-up, the initial encoder
scale against its derivation, the L0-target controller (against a reference, in training steps only,
reaching its target, exact resume; identical on two data-parallel ranks:
tests/integration/sae/test_arch_relu_dp.py), the exact decoder-norm fold of the export, tied weights
(shared storage, summed gradient, exact resume) and the `sae-train sae=relu` console script. Seeds from
the conftest's fixed seed or fixed here (seed in the messages)."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.sae import (
    l1_cfg,
    randomize_weights,
    reference_l1_controller,
    sae_train_on_sparse_atoms,
    train_l0_by_l1_coef,
)
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic
from safetensors.torch import load_file

from sae_dist.eval.synthetic import SyntheticDictionary, mean_max_cosine
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae, load_sae
from sae_dist.sae.registry import build_sae
from sae_dist.sae.relu import ReLUSAE, auto_init_scale, l1_coef_at, l1_controller_step
from sae_dist.store import write_store
from sae_dist.train.trainer import TrainerConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


_cfg = partial(l1_cfg, "relu")


_randomize = partial(randomize_weights, row_scale=True, b_enc_scale=0.3)


# ----------------------------------------------------------------------------------------------
# training on a known dictionary

# Data: 64 unit features in R^32, each on with p = 0.05 (true L0 = 3.2), magnitudes U[0.5, 2]; total
# variance D = 64 * (0.05 * 1.75 - 0.05^2 * 1.25^2) ~ 5.35. With the NMSE loss the L1 soft threshold is
# tau = l1_coef * D / 2 (see ReLUOptions): l1_coef = 0.12 puts it at ~0.32, below every true
# coefficient (>= 0.5) yet above most feature-interference (cosines ~ 1/sqrt(32)).
_GT_L1 = 0.12
# lr 1e-2 on 512-token batches converges within 300k tokens (the paper's rule, 2.3e-3 at n = 128, needed
# ~3x more tokens for an L1 SAE to settle; the trainer's default is 3x that rule)
_GT_TRAIN = dict(tokens=300_000, batch_tokens=512, lr=1e-2)


def test_relu_recovers_a_synthetic_dictionary(tmp_path):
    seed = torch_seed()
    cfg = SAEConfig(d_in=32, d_sae=128, k=None, architecture="relu", normalize="none",
                    options={"l1_coef": _GT_L1})
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, seed=seed, **_GT_TRAIN)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))  # a random decoder: the metric can fail
    after = mean_max_cosine(sd.features, loaded.W_dec)
    assert before < 0.7, before
    assert after >= 0.9, (after, seed)
    # exported decoder rows are unit norm (decoder norms folded into the encoder)
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(128), rtol=1e-5, atol=1e-5)
    # L0 of the exported SAE on fresh samples. Lower bound: every active coefficient (>= 0.5) exceeds
    # tau ~ 0.32, so each of the ~3.2 active features needs at least one latent (15% slack for tokens the
    # encoder misses). Upper bound: L1 is indifferent to splitting a feature between two parallel
    # latents and d_sae = 2 * n_features leaves room for one duplicate per feature (<= 2 x true),
    # plus small interference fires (~0.5 per token measured; 0.75 x true allowed): 2.75 x true.
    # (No L1 at all gives L0 > 10 here.)
    x, coef = sd.sample(4096)
    true_l0 = float((coef > 0).sum(1).float().mean())
    assert abs(true_l0 - 3.2) < 0.2
    with torch.no_grad():
        l0 = float((loaded.encode(x) > 0).sum(1).float().mean())
    assert 0.85 * true_l0 <= l0 <= 2.75 * true_l0, (l0, true_l0, seed)
    assert abs(res["metrics"]["train/l0"] - l0) < 0.25 * l0  # the trainer's last-batch L0 agrees
    with torch.no_grad():
        xh = loaded(x).double()
    xd = x.double()
    fvu = float(((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert fvu < 0.3, (fvu, seed)  # L1 shrinkage costs some reconstruction, but the model is not trivial


def test_a_larger_l1_coefficient_gives_a_lower_l0(tmp_path):
    seed = torch_seed()
    l0 = train_l0_by_l1_coef(tmp_path, "relu", seed)
    assert l0[0.3] < 0.5 * l0[0.03], (l0, seed)


# ----------------------------------------------------------------------------------------------
# unit checks against independent references


@pytest.mark.parametrize("decoder_norm", [True, False])
def test_loss_matches_a_numpy_computation(decoder_norm):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    l1, frac, n_steps = float(rng.uniform(0.01, 0.5)), float(rng.uniform(0.05, 0.5)), int(rng.integers(20, 200))
    step = int(rng.integers(0, n_steps))
    sae = build_sae(_cfg(l1_coef=l1, l1_warmup_frac=frac, l1_decoder_norm=decoder_norm))
    _randomize(sae, g, row_scale=decoder_norm)
    sae.set_progress(step, n_steps)
    x = 2.0 * torch.randn(64, 12, generator=g) + torch.randn(12, generator=g)
    res = sae.training_step_losses(x, torch.zeros(40, dtype=torch.bool))

    X = x.double().numpy()
    We, be = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    Wd, bd = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    z = np.zeros((64, 40))
    for b in range(64):
        for i in range(40):
            z[b, i] = max(0.0, float(np.dot(X[b] - bd, We[:, i]) + be[i]))
    xh = z @ Wd + bd
    nmse = ((X - xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    w = np.linalg.norm(Wd, axis=1) if decoder_norm else np.ones(40)
    pen = (np.abs(z) * w).sum(1).mean()
    lam = float(np.interp(step, [0.0, frac * n_steps], [0.0, l1]))  # linear ramp, flat after
    msg = f"seed {seed}"
    np.testing.assert_allclose(float(res.fvu), nmse, rtol=1e-5, err_msg=msg)
    np.testing.assert_allclose(float(res.terms["l1"]), pen, rtol=1e-5, err_msg=msg)
    np.testing.assert_allclose(float(res.terms["l1_coef"]), lam, rtol=1e-6, atol=1e-9, err_msg=msg)
    np.testing.assert_allclose(float(res.loss.detach()), nmse + lam * pen, rtol=1e-5, err_msg=msg)
    np.testing.assert_allclose(res.x_hat.double().numpy(), xh, rtol=1e-4, atol=1e-4, err_msg=msg)
    assert int(res.l0_sum) == int((z > 0).sum()), msg
    assert torch.equal(res.fired, torch.from_numpy((z > 0).any(0))), msg
    assert float(res.auxk_loss) == 0.0


def test_l1_warmup_schedule():
    seed = torch_seed()
    rng = np.random.default_rng(seed)
    l1, frac, n_steps = float(rng.uniform(0.1, 2)), float(rng.uniform(0.02, 0.6)), int(rng.integers(50, 500))
    end = frac * n_steps
    for step in [0, 1, int(end / 3), int(end / 2), max(int(end) - 1, 0), int(np.ceil(end)), n_steps - 1]:
        want = l1 * step / end if step < end else l1  # 0 at step 0, linear, l1 from step >= end on
        assert np.isclose(l1_coef_at(l1, frac, step, n_steps), want, rtol=1e-12), (step, seed)
    assert l1_coef_at(l1, 0.0, 0, n_steps) == l1  # no warm-up
    assert l1_coef_at(l1, frac, None, None) == l1  # outside the trainer
    # through the module: the logged coefficient and the loss follow the schedule
    sae = build_sae(_cfg(l1_coef=l1, l1_warmup_frac=frac))
    x = torch.randn(32, 12)
    values = []
    for step in range(n_steps):
        sae.set_progress(step, n_steps)
        values.append(float(sae.training_step_losses(x).terms["l1_coef"]))
    ref = l1 * np.minimum(1.0, np.arange(n_steps) / end)
    np.testing.assert_allclose(values, ref, rtol=1e-6, atol=1e-12, err_msg=f"seed {seed}")
    assert values[0] == 0.0 and values[-1] == pytest.approx(l1)


@pytest.mark.parametrize("normalize", ["none", "scalar"])
@pytest.mark.parametrize("tied", [False, True])
def test_export_folds_decoder_norms_and_reproduces_the_training_forward(tmp_path, normalize, tied):
    """load_sae(export(sae)) on raw x reproduces the TRAINING forward (training_step_losses' x^) on the
    normalised x = s * raw, with unit decoder rows although the trained rows are not unit."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(_cfg(normalize=normalize, l1_decoder_norm=True, tied_weights=tied))
    _randomize(sae, g, row_scale=True)
    norms = sae.W_dec.detach().norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1  # the fold has something to do
    s = 0.5 + float(torch.rand((), generator=g)) if normalize == "scalar" else 1.0
    export_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post", model_name="m",
               normalize=normalize, scale=s if normalize == "scalar" else None)
    loaded = load_sae(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and "k" not in cfg
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(40), rtol=1e-5, atol=1e-5)
    raw = 2.0 * torch.randn(100, 12, generator=g) + 0.5
    x = raw * s
    res = sae.training_step_losses(x)
    with torch.no_grad():
        z = sae.encode(x)
        z_l = loaded.encode(raw)
        xh_l = loaded(raw)
    msg = f"seed {seed}"
    torch.testing.assert_close(xh_l * s, res.x_hat, rtol=1e-4, atol=1e-4, msg=msg)
    # exported latents = training latents x decoder row norm (the penalised quantity), / s
    torch.testing.assert_close(z_l * s, z * norms, rtol=1e-4, atol=1e-4, msg=msg)
    assert int((z_l > 0).sum()) == int(res.l0_sum), msg
    # the fold is exact math: W_enc' = W_enc * n, b_enc' = b_enc * n / s
    torch.testing.assert_close(loaded.W_enc, sae.W_enc.detach() * norms, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded.b_enc * s, sae.b_enc.detach() * norms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder_norm", [True, False])
def test_tied_weights_share_storage_and_gradient(decoder_norm):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    tied = build_sae(_cfg(tied_weights=True, l1_coef=0.1, l1_decoder_norm=decoder_norm))
    assert [n for n, _ in tied.named_parameters()] == ["b_enc", "W_dec", "b_dec"]
    assert set(tied.state_dict()) == {"b_enc", "W_dec", "b_dec"}
    torch.testing.assert_close(tied.W_enc, tied.W_dec.T, rtol=0, atol=0)  # tied init
    _randomize(tied, g, row_scale=decoder_norm)
    W = tied.W_enc
    assert W.shape == (12, 40) and W.data_ptr() == tied.W_dec.data_ptr()  # a view, not a copy
    with torch.no_grad():
        tied.W_dec[3, 5] += 1.0
    assert W[5, 3] == tied.W_dec[3, 5]
    # reference: an untied SAE holding the same numbers; d loss / d W_dec(tied) must be the sum of the
    # decoder gradient and the transposed encoder gradient of the untied copy (chain rule)
    ref = build_sae(_cfg(l1_coef=0.1, l1_decoder_norm=decoder_norm))
    with torch.no_grad():
        for name in ("b_enc", "W_dec", "b_dec"):
            getattr(ref, name).copy_(getattr(tied, name))
        ref.W_enc.copy_(tied.W_dec.T)
    x = torch.randn(64, 12, generator=g) + 0.3
    lt, lr = tied.training_step_losses(x).loss, ref.training_step_losses(x).loss
    torch.testing.assert_close(lt, lr)
    lt.backward()
    lr.backward()
    msg = f"seed {seed}"
    torch.testing.assert_close(tied.W_dec.grad, ref.W_dec.grad + ref.W_enc.grad.T, msg=msg)
    torch.testing.assert_close(tied.b_enc.grad, ref.b_enc.grad, msg=msg)
    torch.testing.assert_close(tied.b_dec.grad, ref.b_dec.grad, msg=msg)
    # an optimizer step moves encoder and decoder together
    torch.optim.SGD(tied.parameters(), lr=0.1).step()
    torch.testing.assert_close(tied.W_enc, tied.W_dec.T, rtol=0, atol=0)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"l1_coef=-1.*>= 0"):
        ReLUSAE(_cfg(l1_coef=-1))
    with pytest.raises(ValueError, match=r"l1_warmup_frac=1.5.*\[0.0, 1.0\]"):
        ReLUSAE(_cfg(l1_warmup_frac=1.5))
    with pytest.raises(ValueError, match="l1_decoder_norm='yes'"):
        ReLUSAE(_cfg(l1_decoder_norm="yes"))
    with pytest.raises(ValueError, match="enc_init_scale"):
        ReLUSAE(SAEConfig(d_in=8, d_sae=16, k=None, architecture="relu", enc_init_scale=0.5,
                          options={"tied_weights": True}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['k_l1'\]"):
        ReLUSAE(_cfg(k_l1=3))
    with pytest.raises(ValueError, match=r"init_scale='big'.*\"auto\" or a number > 0"):
        ReLUSAE(_cfg(init_scale="big"))
    with pytest.raises(ValueError, match=r"init_scale=0.*\"auto\" or a number > 0"):
        ReLUSAE(_cfg(init_scale=0))
    with pytest.raises(ValueError, match=r"init_scale=0.5"):
        ReLUSAE(_cfg(init_scale=0.5, tied_weights=True))
    with pytest.raises(ValueError, match=r"target_l0=-2.*null or a number > 0"):
        ReLUSAE(_cfg(target_l0=-2))
    with pytest.raises(ValueError, match=r"l1_coef=0.0 must be > 0 with target_l0"):
        ReLUSAE(_cfg(target_l0=4, l1_coef=0))
    with pytest.raises(ValueError, match=r"l0_gain=0.*\(0, 1\]"):
        ReLUSAE(_cfg(target_l0=4, l0_gain=0))
    with pytest.raises(ValueError, match=r"l0_tau_frac=2.*\[0.0, 1.0\]"):
        ReLUSAE(_cfg(l0_tau_frac=2))


# ----------------------------------------------------------------------------------------------
# trainer integration


@pytest.mark.parametrize("decoder_norm", [True, False])
def test_tied_relu_resumes_exactly(tmp_path, decoder_norm):
    """Stopped at step 19 (checkpoints every 8) then resumed == uninterrupted: same logged losses
    (L1 warm-up crossing the resume point), bit-identical exported weights; EMA and clipping on."""
    seed = torch_seed()
    sd = SyntheticDictionary(16, 32, p_active=0.1, seed=seed)
    x, _ = sd.sample(3000)
    store = write_store(tmp_path / "s.zarr", x.numpy(), attrs={"model": "synthetic", "hook_name": "none"},
                        chunk_tokens=512, shard_tokens=1024)
    sae_cfg = SAEConfig(d_in=16, d_sae=64, k=None, architecture="relu", normalize="scalar",
                        options={"tied_weights": True, "l1_coef": 0.05, "l1_warmup_frac": 0.8,
                                 "l1_decoder_norm": decoder_norm})

    def tcfg(max_steps=None):
        return TrainerConfig(tokens=128 * 30, batch_tokens=128, lr=4e-3, warmup_steps=3, lr_decay_frac=0.3,
                             ema=True, ema_decay=0.9, grad_clip_norm=1.0, checkpoint_every_steps=8,
                             keep_checkpoints=2, log_every_steps=1, max_steps=max_steps, prefetch=2)

    kw = dict(store_path=store, sae_cfg=sae_cfg, progress=False, seed=seed % 1000, wandb_cfg={"enabled": False})
    la, lb = _uninterrupted_and_resumed_logs(tmp_path, tcfg, kw)
    assert la == lb, f"seed {seed}"
    assert la[15]["train/l1_coef"] < la[-1]["train/l1_coef"] == pytest.approx(0.05)  # warm-up spans step 16
    wa = load_file(str(tmp_path / "a" / "sae" / "sae_weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(wa[name], wb[name]), (name, seed)
    # the exported encoder is the (folded) transpose of the exported decoder: the weights stayed tied
    n = wa["W_enc"].norm(dim=0) if decoder_norm else torch.ones(64)
    torch.testing.assert_close(wa["W_enc"] / n, wa["W_dec"].T, rtol=1e-5, atol=1e-6)


def test_sae_train_console_script_with_sae_relu(tmp_path, console_script):
    d = 24
    acts, proc, run = sae_train_on_sparse_atoms(  # sae-train, in this process (conftest.py)
        console_script, tmp_path, "sae=relu", "sae.d_sae=64", "sae.l1_coef=0.02", "sae.tied_weights=true")
    assert proc.returncode == 0, proc.stderr[-6000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["d_in"] == d and cfg["d_sae"] == 64
    st = json.loads((run / "sae" / "training_state.json").read_text())
    assert st["sae_cfg"]["architecture"] == "relu"
    assert st["sae_cfg"]["options"] == {"l1_coef": 0.02, "l1_warmup_frac": 0.05, "l1_decoder_norm": True,
                                        "tied_weights": True, "init_scale": "auto", "target_l0": None,
                                        "l0_gain": 0.01, "l0_tau_frac": 0.1}
    sae = load_sae(run / "sae")
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(acts[:512]))
    assert (z >= 0).all() and 0 < float((z > 0).sum(1).float().mean()) < 64


# ----------------------------------------------------------------------------------------------
# the initial encoder scale (init_scale) and the L0-target controller (target_l0): unit checks


@pytest.mark.parametrize("d,n", [(32, 256), (64, 512), (24, 40)])
def test_auto_init_scale_makes_the_first_reconstruction_the_input_scale(d, n):
    """Monte Carlo check of the derivation in `ReLUOptions`: with W_enc = c W_dec^T (random unit rows)
    and b_enc = b_dec = 0, the first reconstruction is ~ c n / (2 d) x, so "auto" (c = min(1, 2d/n))
    gives ~ x (n >= 2d) and c = 1 gives ~ n / (2d) x. Measured as the least-squares slope of x^ on x."""
    g = torch.Generator().manual_seed(1234 + d)
    x = torch.randn(4096, d, generator=g)

    def slope(**options):
        sae = ReLUSAE(_cfg(d=d, n=n, **options), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            sae.b_dec.zero_()
            xh = sae(x)
        return float((xh * x).sum() / (x * x).sum())

    assert slope(init_scale=1.0) == pytest.approx(n / (2 * d), rel=0.1)
    assert slope() == pytest.approx(min(1.0, n / (2 * d)), rel=0.1)
    assert auto_init_scale(d, n, tied_weights=False) == min(1.0, 2 * d / n)
    assert auto_init_scale(d, n, tied_weights=True) == 1.0


def test_init_scale_reaches_the_trainers_reinitialisation():
    """The trainer re-initialises every SAE with `tied_init_rows_` (reading sae.cfg.enc_init_scale):
    the ReLU encoder must come out init_scale * enc_init_scale * W_dec^T there too."""
    from sae_dist.sae.init import tied_init_rows_

    cfg = SAEConfig(d_in=16, d_sae=128, k=None, architecture="relu", enc_init_scale=0.5)
    sae = ReLUSAE(cfg)
    assert cfg.enc_init_scale == 0.5  # the caller's config is not modified
    assert sae.cfg.enc_init_scale == pytest.approx(0.5 * 2 * 16 / 128)
    with torch.no_grad():
        tied_init_rows_(sae, seed=3)
    torch.testing.assert_close(sae.W_enc, 0.125 * sae.W_dec.T, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(128))
    # a number overrides "auto"; tied weights keep 1
    assert ReLUSAE(_cfg(d=16, n=128, init_scale=0.3)).cfg.enc_init_scale == pytest.approx(0.3)
    tied = ReLUSAE(_cfg(d=16, n=128, tied_weights=True))
    assert tied.cfg.enc_init_scale == 1.0


def test_controller_step_matches_a_reference():
    rng = np.random.default_rng(5)
    target, gain, tau = 6.0, 0.03, 7.0
    l0s = np.concatenate([np.geomspace(200, 2, 40), rng.uniform(0, 12, 40), [0.0, 6.0, 6.0]])
    state = (np.log(0.02), math.nan, 0.0)
    got = [state[0]]
    for l0 in l0s:
        state = l1_controller_step(state, float(l0), target, gain, tau)
        got.append(state[0])
    np.testing.assert_allclose(got, reference_l1_controller(l0s, target, gain, tau, np.log(0.02)), rtol=0, atol=1e-12)
    # direction and bounds: above the target and not approaching -> up by gain; below -> down; at it, held
    assert l1_controller_step((0.0, math.nan, 0.0), 6.0 * math.e**2, 6.0, 0.05, 10.0)[0] == pytest.approx(0.05)
    assert l1_controller_step((0.0, math.nan, 0.0), 12.0, 6.0, 0.05, 10.0)[0] == pytest.approx(0.05 * math.log(2))
    assert l1_controller_step((0.0, math.nan, 0.0), 3.0, 6.0, 0.05, 10.0)[0] == pytest.approx(-0.05 * math.log(2))
    assert l1_controller_step((0.0, 0.0, 0.0), 6.0, 6.0, 0.05, 10.0) == (0.0, 0.0, 0.0)
    # L0 falling fast towards the target (e 1 -> 0.5, rate -0.05 after smoothing): e + tau r = 0 holds
    s = l1_controller_step((0.0, 1.0, 0.0), 6.0 * math.exp(0.5), 6.0, 0.05, 10.0)
    assert s[0] == pytest.approx(0.0, abs=1e-12) and s[2] == pytest.approx(-0.05)


def test_controller_runs_in_training_steps_after_the_warmup_only():
    g = torch.Generator().manual_seed(11)
    sae = build_sae(_cfg(target_l0=5.0, l1_coef=0.05, l1_warmup_frac=0.5, l0_gain=0.02))
    _randomize(sae, g)
    assert set(sae.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "l1_controller"}
    assert "l1_controller" not in build_sae(_cfg()).state_dict()  # no buffer without a target
    x = torch.randn(200, 12, generator=g)
    start = sae.l1_controller.clone()
    sae.set_progress(3, 10)  # warm-up (ends at step 5): lambda ramps, the controller waits
    res = sae.training_step_losses(x)
    assert float(res.terms["l1_coef"]) == pytest.approx(0.05 * 3 / 5)
    torch.testing.assert_close(sae.l1_controller, start, rtol=0, atol=0, equal_nan=True)
    sae.set_progress(5, 10)
    with torch.no_grad():  # an evaluation: no update
        sae.training_step_losses(x)
    sae.eval()
    sae.training_step_losses(x)
    torch.testing.assert_close(sae.l1_controller, start, rtol=0, atol=0, equal_nan=True)
    sae.train()
    with torch.no_grad():
        l0 = float((F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) > 0).sum(1).double().mean())
    assert l0 > 5.0  # a raise is due
    res = sae.training_step_losses(x)
    assert float(res.terms["l1_coef"]) == pytest.approx(0.05)  # this step used the old lambda
    want = reference_l1_controller([l0], 5.0, 0.02, 0.1 * 10, np.log(0.05))[-1]
    assert float(sae.l1_controller[0]) == pytest.approx(want, abs=1e-12)
    assert sae.l1_coef_now() == pytest.approx(math.exp(want))


# ----------------------------------------------------------------------------------------------
# planted dictionary with Zipf-like frequencies and log-normal magnitudes (issue 15, item 5)

# 256 unit features in R^64, 4 active per token on average with p_i ~ 1 / (i + 1) (the most frequent on
# 65% of tokens, the rarest on 0.26%), magnitudes exp(N(0, 0.5^2)), noise 0.01; 512 latents, default
# normalisation (layer_norm) and lr (3.39e-3), 488 steps of 2048 tokens. This is the setting at
# half the tokens; docs/architectures.md has the full-size measurements.
_ZIPF = dict(p_active=4 / 256, freq_exponent=1.0, magnitudes="lognormal", log_std=0.5, noise=0.01, seed=0)
_ZIPF_TRAIN = dict(tokens=1_000_000, batch_tokens=2048, n_store_tokens=65536, seed=0)


def _zipf_run(tmp_path, **options):
    sd = SyntheticDictionary(64, 256, **_ZIPF)
    cfg = SAEConfig(d_in=64, d_sae=512, k=None, architecture="relu", options=options)
    _, res, loaded = train_on_synthetic(tmp_path, cfg, dictionary=sd, **_ZIPF_TRAIN)
    x, coef = sd.sample(8192)
    with torch.no_grad():
        l0 = float((loaded.encode(x) > 0).sum(1).float().mean())
        xh = loaded(x).double()
    xd = x.double()
    fvu = float(((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    true_l0 = float((coef > 0).sum(1).float().mean())
    return dict(mmcs=mean_max_cosine(sd.features, loaded.W_dec), l0=l0, fvu=fvu, true_l0=true_l0,
                train_l0=res["metrics"]["train/l0"], random=mean_max_cosine(sd.features, torch.randn(512, 64)))


@pytest.mark.slow  # trains through the real trainer (or loads the embedded LM): over 10 s
def test_relu_recovers_a_zipf_lognormal_dictionary_at_the_true_l0(tmp_path):
    """target_l0 = the true L0 with the default options: the dictionary is recovered (MMCS >= 0.9, a
    random decoder scores ~0.37) at L0 within 20% of the truth, and the SAE still explains > 40% of the
    variance. The same run with the plain tied init (init_scale=1, the behaviour before issue 15) also
    reaches the L0 but at a clearly higher fvu (measured 0.42 vs 0.84 with the reader's whole-shard order,
    0.36 vs 0.56 with its inner-chunk order; the data are i.i.d., so the order only changes the noise): the
    L1 term then has to shrink a reconstruction that starts n / (2 d_in) = 4 times too large (ReLUOptions)."""
    new = _zipf_run(tmp_path / "auto", target_l0=4.0)
    assert abs(new["true_l0"] - 4.0) < 0.1, new
    assert new["random"] < 0.45, new
    assert new["mmcs"] >= 0.9, new
    assert 0.8 * new["true_l0"] <= new["l0"] <= 1.2 * new["true_l0"], new
    assert abs(new["train_l0"] - 4.0) < 0.8, new
    assert new["fvu"] < 0.6, new
    old = _zipf_run(tmp_path / "one", target_l0=4.0, init_scale=1.0)
    assert old["mmcs"] >= 0.9 and 0.8 * old["true_l0"] <= old["l0"] <= 1.2 * old["true_l0"], old
    assert old["fvu"] > 1.3 * new["fvu"], (old, new)


def test_target_l0_resumes_exactly(tmp_path):
    """Stopped at step 19 (checkpoints every 8) then resumed == uninterrupted, with the controller
    moving lambda across the resume point: same logged lambda and losses, same controller state,
    bit-identical exported weights (EMA on: the buffer is copied into the EMA model too)."""
    sd = SyntheticDictionary(16, 32, p_active=0.1, seed=3)
    x, _ = sd.sample(3000)
    store = write_store(tmp_path / "s.zarr", x.numpy(), attrs={"model": "synthetic", "hook_name": "none"},
                        chunk_tokens=512, shard_tokens=1024)
    sae_cfg = SAEConfig(d_in=16, d_sae=64, k=None, architecture="relu", normalize="scalar",
                        options={"target_l0": 2.0, "l1_coef": 0.05, "l1_warmup_frac": 0.1, "l0_gain": 0.05})

    def tcfg(max_steps=None):
        return TrainerConfig(tokens=128 * 30, batch_tokens=128, lr=4e-3, warmup_steps=3, ema=True, ema_decay=0.9,
                             checkpoint_every_steps=8, keep_checkpoints=2, log_every_steps=1, max_steps=max_steps,
                             prefetch=2)

    kw = dict(store_path=store, sae_cfg=sae_cfg, progress=False, seed=5, wandb_cfg={"enabled": False})
    la, lb = _uninterrupted_and_resumed_logs(tmp_path, tcfg, kw)
    assert la == lb
    coefs = [r["train/l1_coef"] for r in la]
    assert len(set(coefs[15:])) > 10  # the controller moves lambda at every step around the resume point
    assert coefs[2] == pytest.approx(0.05 * 2 / 3)  # warm-up (3 steps), then the controller from 0.05
    wa = load_file(str(tmp_path / "a" / "sae" / "sae_weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(wa[name], wb[name]), name
    from sae_dist.train.checkpoint import latest_checkpoint, read_checkpoint_tensors

    ca = read_checkpoint_tensors(latest_checkpoint(tmp_path / "a" / "checkpoints")[1], "buffers")
    cb = read_checkpoint_tensors(latest_checkpoint(tmp_path / "b" / "checkpoints")[1], "buffers")
    assert set(ca) == set(cb) and len(ca) == 1
    (key,) = ca
    assert torch.equal(ca[key], cb[key]) and ca[key].dtype == torch.float64
    assert math.exp(float(ca[key][0])) != pytest.approx(0.05)  # it moved


def test_target_l0_lowers_lambda_to_reach_a_higher_target(tmp_path):
    """From a lambda far too large (0.3: L0 ~2 at a fixed lambda) the controller lowers lambda until
    the training L0 is the target 10 (the zipf test above covers a target below the starting L0).
    lr 1.6e-3 is the paper's rule at n = 256: at the trainer's 3x default, lambda 0.3 silences every
    latent within 40 steps (L0 0.05) and the controller, which moves lambda by at most e^0.01 a step,
    needs ~200 steps to revive them (L0 3.5 at the end, measured)."""
    sd = SyntheticDictionary(32, 128, **{**_ZIPF, "p_active": 4 / 128})
    train_kw = dict(dictionary=sd, tokens=400_000, batch_tokens=1024, n_store_tokens=65536, seed=0, lr=1.6e-3)
    cfg = SAEConfig(d_in=32, d_sae=256, k=None, architecture="relu", options={"l1_coef": 0.3})
    _, fixed, _ = train_on_synthetic(tmp_path / "fixed", cfg, **train_kw)
    assert fixed["metrics"]["train/l0"] < 5, fixed["metrics"]
    cfg = SAEConfig(d_in=32, d_sae=256, k=None, architecture="relu", options={"l1_coef": 0.3, "target_l0": 10})
    _, res, loaded = train_on_synthetic(tmp_path / "target", cfg, **train_kw)
    m = res["metrics"]
    assert abs(m["train/l0"] - 10) < 1.5, m
    assert m["train/l1_coef"] < 0.2, m
    x, _ = sd.sample(8192)
    with torch.no_grad():
        l0 = float((loaded.encode(x) > 0).sum(1).float().mean())
    assert 8 <= l0 <= 12, l0
    assert mean_max_cosine(sd.features, loaded.W_dec) >= 0.9


def test_synthetic_dictionary_zipf_and_lognormal_options():
    """The defaults draw the same numbers as the plain sampler written out here; Zipf frequencies and
    log-normal magnitudes follow their formulas; impossible frequencies are refused."""
    sd = SyntheticDictionary(8, 20, p_active=0.1, seed=4)
    x, coef = sd.sample(50)
    g = torch.Generator().manual_seed(4)
    f = torch.randn(20, 8, generator=g)
    f = f / f.norm(dim=-1, keepdim=True)
    on = torch.rand(50, 20, generator=g) < 0.1
    ref_coef = on * (0.5 + 1.5 * torch.rand(50, 20, generator=g))
    ref_x = ref_coef @ f + 0.01 * torch.randn(50, 8, generator=g)
    assert torch.equal(sd.features, f) and torch.equal(coef, ref_coef) and torch.equal(x, ref_x)

    sd = SyntheticDictionary(16, 50, p_active=0.04, freq_exponent=1.2, magnitudes="lognormal", log_mean=0.3,
                             log_std=0.7, seed=5)
    w = np.arange(1, 51) ** -1.2
    p = 0.04 * 50 * w / w.sum()
    np.testing.assert_allclose(sd.probs.numpy(), p, rtol=1e-6)
    _, coef = sd.sample(40000)
    freq = (coef > 0).float().mean(0).numpy()
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / 40000) + 1e-4), (freq, p)  # 4 binomial sd
    assert float((coef > 0).sum(1).float().mean()) == pytest.approx(2.0, abs=0.05)
    logs = coef[coef > 0].log()
    assert float(logs.mean()) == pytest.approx(0.3, abs=0.02) and float(logs.std()) == pytest.approx(0.7, abs=0.02)
    with pytest.raises(ValueError, match="probability 2.997 > 1"):
        SyntheticDictionary(4, 10, p_active=0.3, freq_exponent=10.0)
    with pytest.raises(ValueError, match="magnitudes='gamma'"):
        SyntheticDictionary(4, 10, magnitudes="gamma")


def _uninterrupted_and_resumed_logs(tmp_path, tcfg, kw):
    """Train 30 steps in run a, and in run b 19 steps then a resume to 30: the two train_log.jsonl row
    lists (without the timing key)."""
    train(out_dir=tmp_path / "a", trainer_cfg=tcfg(), **kw)
    r1 = train(out_dir=tmp_path / "b", trainer_cfg=tcfg(max_steps=19), **kw)
    assert r1["stopped_early"] and r1["steps"] == 19
    r2 = train(out_dir=tmp_path / "b", trainer_cfg=tcfg(), **kw)
    assert r2["steps"] == 30 and not r2["stopped_early"]

    def log(run):
        rows = [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]

    la, lb = log("a"), log("b")
    assert [r["step"] for r in lb] == list(range(1, 31))
    return la, lb
