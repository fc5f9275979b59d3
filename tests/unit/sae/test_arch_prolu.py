"""`sae=prolu` (ProLU, Taggart 2024; a baseline of Gao et al. 2024): the custom autograd Function against
its closed form and the documented synthetic gradients, the loss and a parameter gradient against
numpy, the export's forward, ground-truth recovery through the real trainer, L1 -> sparsity, and the
`sae-train sae=prolu` console script. Fresh random data every run (seed in the messages)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from helpers.sae import l1_cfg, randomize_weights, sae_train_on_sparse_atoms, train_l0_by_l1_coef
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic

from sae_dist.eval.synthetic import mean_max_cosine
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae, load_sae
from sae_dist.sae.prolu import ProLUSAE, prolu
from sae_dist.sae.registry import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


_cfg = partial(l1_cfg, "prolu")


_randomize = partial(randomize_weights, row_scale=False, b_enc_scale=0.5)


# ----------------------------------------------------------------------------------------------
# the ProLU Function


@pytest.mark.parametrize("ste", ["ste", "relu"])
def test_prolu_function_forward_and_synthetic_gradients(ste):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(50, 30, generator=g, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    up = torch.randn(50, 30, generator=g, dtype=torch.float64)
    m.requires_grad_(True)
    b.requires_grad_(True)
    z = prolu(m, b, ste)
    gm, gb = torch.autograd.grad((z * up).sum(), (m, b))
    M, B, U = m.detach().numpy(), b.detach().numpy(), up.numpy()
    # closed form, elementwise loop (Taggart 2024): z = m if m > 0 and m + b > 0 else 0
    ref = np.zeros_like(M)
    gate = np.zeros_like(M, dtype=bool)
    for i in range(50):
        for j in range(30):
            gate[i, j] = M[i, j] > 0 and M[i, j] + B[j] > 0
            ref[i, j] = M[i, j] if gate[i, j] else 0.0
    assert gate.any() and (~gate & (M > 0)).any()  # both gate conditions exercised
    np.testing.assert_array_equal(z.detach().numpy(), ref)
    # documented surrogates: ProLU-ReLU dz/dm = dz/db = 1 on the gate; ProLU-STE dz/db = m, dz/dm = 1 + m
    if ste == "ste":
        ref_gm, ref_gb = U * gate * (1 + M), (U * gate * M).sum(0)
    else:
        ref_gm, ref_gb = U * gate, (U * gate).sum(0)
    np.testing.assert_allclose(gm.numpy(), ref_gm, rtol=1e-12, atol=1e-12, err_msg=f"seed {seed}")
    np.testing.assert_allclose(gb.numpy(), ref_gb, rtol=1e-12, atol=1e-12, err_msg=f"seed {seed}")


def test_prolu_function_mixed_precision_and_bad_variant():
    """bf16 m (autocast matmul output) with an fp32 bias: gradients come back in each input's dtype."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    m32 = torch.randn(64, 16, generator=g)
    b = torch.randn(16, generator=g, requires_grad=True)
    m = m32.bfloat16().requires_grad_(True)
    z = prolu(m, b, "ste")
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    assert m.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
    mf = m.detach().float()
    gate = (mf > 0) & (mf + b.detach() > 0)
    torch.testing.assert_close(b.grad, (gate * mf).sum(0), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="ste='straight'.*valid: ste, relu"):
        prolu(m, b, "straight")
    with pytest.raises(ValueError, match="ste='x'"):
        ProLUSAE(_cfg(ste="x"))


# ----------------------------------------------------------------------------------------------
# the SAE's loss, gradients and export


@pytest.mark.parametrize("ste", ["ste", "relu"])
def test_loss_and_bias_gradient_match_numpy(ste):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    l1 = float(rng.uniform(0.01, 0.5))
    sae = build_sae(_cfg(l1_coef=l1, l1_warmup_frac=0.0, ste=ste))
    _randomize(sae, g)
    x = 2.0 * torch.randn(64, 12, generator=g) + torch.randn(12, generator=g)
    res = sae.training_step_losses(x)
    res.loss.backward()

    X = x.double().numpy()
    We, be = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    Wd, bd = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    m = (X - bd) @ We
    gate = (m > 0) & (m + be > 0)
    z = np.where(gate, m, 0.0)
    xh = z @ Wd + bd
    den = ((X - X.mean(0)) ** 2).sum()
    nmse = ((X - xh) ** 2).sum() / den
    pen = np.abs(z).sum(1).mean()  # unit-norm decoder by default for prolu: plain L1
    msg = f"seed {seed}"
    np.testing.assert_allclose(float(res.fvu), nmse, rtol=1e-5, err_msg=msg)
    np.testing.assert_allclose(float(res.terms["l1"]), pen, rtol=1e-5, err_msg=msg)
    np.testing.assert_allclose(float(res.loss.detach()), nmse + l1 * pen, rtol=1e-5, err_msg=msg)
    assert int(res.l0_sum) == int(gate.sum()), msg
    # dL/db_enc through the documented surrogate: dL/dz = 2 (x^ - x) W_dec^T / den + l1 / B (z > 0)
    dz = 2 * (xh - X) @ Wd.T / den + l1 / 64.0 * gate
    ref_gb = (dz * gate * (m if ste == "ste" else 1.0)).sum(0)
    np.testing.assert_allclose(sae.b_enc.grad.double().numpy(), ref_gb, rtol=1e-4, atol=1e-6, err_msg=msg)
    ref_gm = dz * gate * ((1 + m) if ste == "ste" else 1.0)
    np.testing.assert_allclose(sae.W_enc.grad.double().numpy(), (X - bd).T @ ref_gm, rtol=1e-4, atol=1e-5,
                               err_msg=msg)


@pytest.mark.parametrize("normalize,opts", [("none", {}), ("scalar", {}),
                                            ("scalar", {"l1_decoder_norm": True, "tied_weights": True})])
def test_export_reproduces_the_training_forward(tmp_path, normalize, opts):
    """load_sae(export(sae)) on raw x (architecture "prolu": m = pre - b_enc, z = m 1[m>0] 1[pre>0])
    reproduces the training forward (the custom Function) on x = s * raw."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(_cfg(normalize=normalize, **opts))
    _randomize(sae, g, row_scale=bool(opts.get("l1_decoder_norm")))
    norms = sae.W_dec.detach().norm(dim=-1)
    s = 0.5 + float(torch.rand((), generator=g)) if normalize == "scalar" else 1.0
    export_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post", model_name="m",
               normalize=normalize, scale=s if normalize == "scalar" else None)
    loaded = load_sae(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "prolu"
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(40), rtol=1e-5, atol=1e-5)
    raw = 2.0 * torch.randn(200, 12, generator=g) + 0.3
    x = raw * s
    res = sae.training_step_losses(x)
    with torch.no_grad():
        z_train = sae.train_latents(x)
        z_inf = sae.encode(x)
        z_l = loaded.encode(raw)
        xh_l = loaded(raw)
    msg = f"seed {seed}"
    torch.testing.assert_close(z_inf, z_train, rtol=1e-5, atol=1e-5, msg=msg)  # inference rule == training
    torch.testing.assert_close(z_l * s, z_train * norms, rtol=1e-4, atol=1e-4, msg=msg)
    torch.testing.assert_close(xh_l * s, res.x_hat, rtol=1e-4, atol=1e-4, msg=msg)
    assert int((z_l > 0).sum()) == int(res.l0_sum) > 0, msg
    assert ((sae.b_enc > 0).any() and (sae.b_enc < 0).any())  # both kinds of thresholds present


# ----------------------------------------------------------------------------------------------
# training


# Same data and scales as tests/unit/sae/test_arch_relu.py: D ~ 5.35, true L0 3.2, coefficients U[0.5, 2]. ProLU's
# bias is a pure threshold on m (no shrinkage of active values), and the STE gradient of the L1 term
# raises each threshold until it sits just under the smallest coefficients its feature takes.
_GT_L1 = 0.12
_GT_TRAIN = dict(tokens=300_000, batch_tokens=512, lr=1e-2)


def test_prolu_recovers_a_synthetic_dictionary(tmp_path):
    seed = torch_seed()
    cfg = SAEConfig(d_in=32, d_sae=128, k=None, architecture="prolu", normalize="none",
                    options={"l1_coef": _GT_L1})
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, seed=seed, **_GT_TRAIN)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))
    after = mean_max_cosine(sd.features, loaded.W_dec)
    assert before < 0.7, before
    assert after >= 0.9, (after, seed)
    # L0 bounds. Lower: thresholds may cut the smallest true coefficients (U[0.5, 2]): a threshold at
    # 0.8 would drop 20% of them, so L0 >= 0.7 x true. Upper: the thresholds remove the small interference
    # fires a ReLU SAE keeps; what remains is a duplicate latent for some features (d_sae = 2 x
    # n_features; L1 does not penalise splitting), bounded by 1.8 x true.
    x, coef = sd.sample(4096)
    true_l0 = float((coef > 0).sum(1).float().mean())
    with torch.no_grad():
        l0 = float((loaded.encode(x) > 0).sum(1).float().mean())  # the export, on fresh samples
    assert 0.7 * true_l0 <= l0 <= 1.8 * true_l0, (l0, true_l0, seed)
    assert abs(res["metrics"]["train/l0"] - l0) < 0.25 * l0  # the trainer's last-batch L0 agrees
    with torch.no_grad():
        xh = loaded(x).double()
    xd = x.double()
    fvu = float(((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert fvu < 0.3, (fvu, seed)


def test_a_larger_l1_coefficient_gives_a_lower_l0(tmp_path):
    seed = torch_seed()
    l0 = train_l0_by_l1_coef(tmp_path, "prolu", seed)
    assert l0[0.3] < 0.5 * l0[0.03], (l0, seed)


def test_sae_train_console_script_with_sae_prolu(tmp_path, console_script):
    d = 24
    acts, proc, run = sae_train_on_sparse_atoms(  # sae-train, in this process (conftest.py)
        console_script, tmp_path, "sae=prolu", "sae.d_sae=64", "sae.ste=relu")
    assert proc.returncode == 0, proc.stderr[-6000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "prolu" and cfg["d_in"] == d and cfg["d_sae"] == 64
    st = json.loads((run / "sae" / "training_state.json").read_text())
    assert st["sae_cfg"]["architecture"] == "prolu" and st["sae_cfg"]["options"]["ste"] == "relu"
    sae = load_sae(run / "sae")
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(acts[:512]))
    assert (z >= 0).all() and 0 < float((z > 0).sum(1).float().mean()) < 64
